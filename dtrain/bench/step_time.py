"""Step time of every technique against PyTorch's own implementation of it, one model, one run.

    python -m dtrain.bench.step_time [--ranks 2] [--steps 20] [--warmup 2] [--pairs ddp,zero1,...]
        [--d-model 256 --n-layers 8 --n-heads 8 --n-kv-heads 4 --seq-len 128 --global-batch 8
        --micro-batch 2 --vocab 4096] [--csv out.csv]

Each pair trains the same model from the canonical initial weights on the same data (global batch
--global-batch rows, micro-batches of --micro-batch, global-norm clipping at train.grad_clip, AdamW), in one
spawned Gloo world of --ranks ranks, one step of ours and one of PyTorch's in turn (harness.contest):

  ddp     ours parallel.zero=0                   torch DDP (gradient_as_bucket_view, no_sync until the last)
  zero1   ours parallel.zero=1                   ZeroRedundancyOptimizer under the same DDP
  zero3   ours parallel.zero=3                   FSDP2, fully_shard per block and the root
  gpipe   ours parallel.pp=ranks, GPipe          torch.distributed.pipelining ScheduleGPipe
  1f1b    ours parallel.pp=ranks, 1F1B           Schedule1F1B
  tp      ours parallel.tp=ranks                 DTensor with torchtitan's plan and loss_parallel
  gpipe-split, 1f1b-split  ours (parallel.pp_split_backward=true, the default)
                                                 ours with parallel.pp_split_backward=false
  ledger  ours DDP logging every step           ours DDP without the ledger
  ledger-every-step  ours DDP, the ledger on every step   ours DDP without the ledger

Ours is a dtrain Trainer's train_step with the ledger off (fit turns it on for sampled logging steps only).
The ledger pairs wrap it in parallel.ledger.CommLedger and read its metrics, as fit does: `ledger` on the
steps fit would count with run.log_every=1 (one in run.ledger_every), `ledger-every-step` on every step
(run.ledger_every=1, the cost of one counted step). A ratio is the median of ours over the median of
theirs (the slowest rank's time of each step); below 1 is faster. The paired ratio is the median over
rounds of ours / theirs in the same round, with a distribution-free 95% interval: where the interval holds
1, this run cannot tell the two apart. The ledger pair's verdict reads the means: its cost falls on one
step in run.ledger_every, which a median does not see.
"""

from __future__ import annotations

import copy
import statistics

from dtrain.bench import harness, report
from dtrain.bench.pipeline import TorchPipeline
from dtrain.bench.tensor_parallel import TorchTensorParallel
from dtrain.bench.zero import TorchDataParallel
from dtrain.config import d_ff_of
from dtrain.runtime import process_grid

# name: (ours, theirs, our layout as overrides; "{n}" is --ranks)
PIPELINE = {s: ["parallel.pp={n}", "parallel.dp=1", f"parallel.pp_schedule={s}"] for s in ("gpipe", "1f1b")}
PAIRS = {
    "ddp": ("ours DDP", "torch DDP", ["parallel.dp={n}", "parallel.zero=0"]),
    "zero1": ("ours ZeRO-1", "ZeroRedundancyOptimizer", ["parallel.dp={n}", "parallel.zero=1"]),
    "zero3": ("ours ZeRO-3", "torch FSDP2", ["parallel.dp={n}", "parallel.zero=3"]),
    "gpipe": ("ours GPipe", "pipelining GPipe", PIPELINE["gpipe"]),
    "1f1b": ("ours 1F1B", "pipelining 1F1B", PIPELINE["1f1b"]),
    "tp": ("ours TP", "DTensor TP", ["parallel.tp={n}", "parallel.dp=1"]),
    "gpipe-split": ("GPipe, split last B", "GPipe, whole B", PIPELINE["gpipe"]),
    "1f1b-split": ("1F1B, split last B", "1F1B, whole B", PIPELINE["1f1b"]),
    "ledger": ("DDP, log_every=1", "DDP, no ledger", ["parallel.dp={n}", "run.log_every=1"]),
    "ledger-every-step": ("DDP, ledger_every=1", "DDP, no ledger", ["parallel.dp={n}", "run.ledger_every=1"]),
}
LEDGER_LIMIT = 1.05  # the ledger may cost at most 5% of a step, on average with logging at every step
LEDGER_PAIRS = ("ledger", "ledger-every-step")
SPLIT_PAIRS = ("gpipe-split", "1f1b-split")


class LedgerSide(harness.TrainerSide):
    """Ours with every step a logging step: fit's logged_step, the ledger on the steps it samples, and
    the ledger's metrics read as the step's record reads them."""

    def train_step(self):
        result = self.trainer.logged_step(logging=True)
        if self.trainer.ledger is not None:
            self.trainer.ledger.metrics()
            self.trainer.ledger = None
        return result


def make_config(args, pair: str):
    layout = [o.format(n=args.ranks) for o in PAIRS[pair][2]]
    batch = [f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}"]
    return harness.config_of(args, [*layout, *batch, "train.eval_batches=0"], args.ranks)


def configs(args) -> dict:
    return {pair: make_config(args, pair) for pair in args.pairs}


def theirs(pair: str, cfg, grid, ours: harness.TrainerSide) -> harness.Implementation:
    if pair in ("ddp", "zero1", "zero3"):
        return TorchDataParallel(
            cfg, {"ddp": "torch-ddp", "zero1": "torch-zero1", "zero3": "torch-fsdp2"}[pair]
        )
    if pair in ("gpipe", "1f1b"):
        return TorchPipeline(cfg, grid, pair, ours.trainer.model.chunks, clock=None)
    if pair == "tp":
        return TorchTensorParallel(cfg, grid)
    if pair in SPLIT_PAIRS:  # ours with every backward run whole
        whole = copy.deepcopy(cfg)
        whole.parallel.pp_split_backward = False
        return harness.TrainerSide(whole, grid)
    return harness.TrainerSide(cfg, grid)  # the ledger pairs: ours without it


def measure_pair(rank: int, args, pair: str) -> dict:
    cfg = make_config(args, pair)
    grid = process_grid(cfg)
    labels = {"ours": PAIRS[pair][0], "theirs": PAIRS[pair][1]}
    ours = (LedgerSide if pair in LEDGER_PAIRS else harness.TrainerSide)(cfg, grid)
    builders = {"ours": lambda: ours, "theirs": lambda: theirs(pair, cfg, grid, ours)}
    done = harness.contest(rank, builders, labels, args.warmup, args.steps, prefix=f"{pair}: ")
    if "ours" in done.errors:
        raise RuntimeError(f"ours failed in {pair}: {done.errors['ours']}")
    row = {"impls": {name: done.summary(name) for name in done.impls}, "errors": done.errors}
    if "theirs" in done.impls:
        o, t = done.step_times("ours"), done.step_times("theirs")
        row["ratio"] = statistics.median(o) / statistics.median(t)
        row["ratio_mean"] = statistics.fmean(o) / statistics.fmean(t)
        row["loss_gap"] = done.loss_gap("ours", "theirs")
        row["paired_ratios"] = done.paired_ratios("ours", "theirs")
        row["paired"] = statistics.median(row["paired_ratios"])
        row["interval"] = harness.median_interval(row["paired_ratios"])
    return row


def measure(rank: int, args) -> dict:
    rows = {pair: measure_pair(rank, args, pair) for pair in args.pairs}
    return {"d_ff": d_ff_of(make_config(args, args.pairs[0]).model), "pairs": rows}


def verdict(pair: str, row: dict) -> str:
    if pair == "ledger-every-step":
        return "(the cost of one counted step)"
    if pair == "ledger":
        return (
            "ok (means)" if row["ratio_mean"] <= LEDGER_LIMIT else f"SLOWER than {LEDGER_LIMIT:.2f} (means)"
        )
    if row["ratio"] <= 1.0:
        return "ok"
    return "above 1.00, within the noise" if row["interval"][0] <= 1.0 else "SLOWER than 1.00"


def format_table(s: dict) -> str:
    c = s["config"]
    lines = [
        *harness.banner(
            "step time, ours against PyTorch's own",
            c["ranks"],
            f"{report.model_line(c, s['d_ff'])} n_kv_heads={c['n_kv_heads']} | seq_len={c['seq_len']}, "
            f"global batch {c['global_batch']}, micro-batch {c['micro_batch']}, clipping on both sides",
        ),
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 untimed, alternating; "
        "step time = slowest rank; ratio = median ours / median theirs (lower is faster for us)",
        "",
        f"{'pair':<18}{'ours':<21}{'ms':>7}  {'theirs':<24}{'ms':>7}{'ratio':>7}{'(mean)':>7}"
        f"{'paired [95% interval]':>23}{'loss gap':>9}  verdict",
    ]
    for pair, row in s["pairs"].items():
        ours, theirs = PAIRS[pair][:2]
        o, t = row["impls"]["ours"], row["impls"].get("theirs")
        head = f"{pair:<18}{ours:<21}{1e3 * o['median_s']:>7.1f}  "
        if t is None:
            lines.append(f"{head}{theirs}: not run, {row['errors']}")
            continue
        lo, hi = row["interval"]
        lines.append(
            f"{head}{theirs:<24}{1e3 * t['median_s']:>7.1f}{row['ratio']:>7.3f}{row['ratio_mean']:>7.3f}"
            f"{row['paired']:>8.3f} [{lo:.3f}, {hi:.3f}]{row['loss_gap']:>9.1e}  {verdict(pair, row)}"
        )
    lines += report.note(
        "paired: the median over the timed rounds of ours / theirs in the same round, with a distribution-"
        "free 95% interval for it (order statistics); a ratio above 1.00 whose interval holds 1.00 is not "
        "told apart from parity by this run. "
        "loss gap: the largest relative difference of the two sides' losses over every step (both train, so "
        "it includes the updates). The split rows compare ours with ours running every backward whole. "
        "The ledger rows compare ours logging every step, the ledger on the steps "
        "run.ledger_every samples (or on every step), with ours without it; the sampled row's limit is "
        f"{LEDGER_LIMIT:.2f} on the means."
    )
    return "\n".join(lines)


def csv_rows(s: dict) -> list[dict]:
    keys = ("ranks", "d_model", "n_layers", "n_heads", "n_kv_heads", "seq_len", "global_batch", "micro_batch")
    rows = []
    for pair, row in s["pairs"].items():
        figures = {k: row.get(k) for k in ("ratio", "ratio_mean", "paired", "loss_gap")}
        figures |= dict(zip(("paired_low", "paired_high"), row.get("interval", (None, None)), strict=True))
        for name, r in row["impls"].items():
            impl = PAIRS[pair][0 if name == "ours" else 1]
            rows.append(
                {k: s["config"][k] for k in keys}
                | {"pair": pair, "impl": impl, "median_s": r["median_s"]}
                | figures
            )
    return rows


def add_arguments(p) -> None:
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    p.add_argument("--global-batch", type=int, default=8, help="rows per step (train.global_batch_size)")


def check(p, args) -> None:
    args.pairs = [x for x in args.pairs.split(",") if x]
    unknown = [x for x in args.pairs if x not in PAIRS]
    if unknown or not args.pairs:
        p.error(f"--pairs {','.join(unknown) or '(none)'}: choose from {', '.join(PAIRS)}")


parse_args, run, main = harness.commands(
    __name__,
    "dtrain's step time against PyTorch's own implementation of each technique, one model, one run",
    "--ranks",
    "every pair",
    steps=20,
    warmup=2,
    model={
        "n_layers": 8,
        "seq_len": 128,
        "vocab": 4096,
        "n_kv_heads": 4,
        "batch": ("--micro-batch", 2, "rows per micro-batch (train.micro_batch_size)"),
    },
)

if __name__ == "__main__":
    raise SystemExit(main())

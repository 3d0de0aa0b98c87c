"""Throughput, MFU and peak memory of the 1B preset on one GPU, each beside `dtrain estimate`'s figure.

    python -m dtrain.bench.gpu [--configs zero0-none,zero3-none,...] [--compile off|on|both]
        [--steps 5] [--warmup 2] [--device cuda|cpu] [--tiny] [--config configs/gpu_1b.yaml]
        [--csv out.csv] [key=value ...]

One process, one rank: dtrain.runtime.init_distributed makes its one-process world (NCCL on the GPU,
Gloo with --device cpu) and every configuration trains the real Trainer in it, one after the other. A
configuration is a layout, parallel.zero in {0, 3} x parallel.offload in {none, optimizer, all}, times
train.compile off/on, on top of the config file in train.precision=bf16. One that `validate` refuses
is reported with its ConfigError, and one that fails while training (out of memory, say) with its
error: neither gets a number.

Per configuration: build the Trainer, --warmup untimed steps (compilation happens there), --steps timed
steps, each between two device synchronisations. Reported: the median step time; tokens/s = tokens of
the global batch / that median; MFU = the trainer's FLOPs per token x tokens/s / the device's peak
(dtrain.runtime.peak_flops: the bf16 table or train.peak_tflops; "-" where unknown); peak memory =
torch.cuda.max_memory_allocated over building, warm-up and timed steps (the counter is reset and the
cache emptied between configurations); beside it `dtrain estimate`'s device peak for the same config
(dtrain.analysis.estimate.peak_device_bytes: model states on the device + the activations kept for
backward) and measured / estimate. The model states the Trainer holds (Trainer.held_bytes) are reported
next to the estimate's, which they equal exactly.

On CPU there is no allocator counter: peak memory and the ratio are "-", and the held bytes are the
memory figure. --tiny shrinks the model and batch (model overrides) so the CPU run takes seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import statistics
import time

import torch
import torch.distributed as dist

from dtrain.bench import harness, report
from dtrain.config import ConfigError, TrainConfig, load_config
from dtrain.validation import validate

# name: (parallel.zero, parallel.offload); validate refuses offload without ZeRO, which the table shows.
LAYOUTS = {
    f"zero{zero}-{offload}": (zero, offload) for zero in (0, 3) for offload in ("none", "optimizer", "all")
}
# Keys every configuration sets itself: an override of one would be silently replaced.
OWNED = ("parallel.zero", "parallel.offload", "train.compile", "train.precision", "dist.backend")
# A model and batch small enough for a CPU smoke run of the same table.
TINY = [
    "model.vocab_size=256",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=176",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
]
NO_COMPILE = "train.compile not available in this build"
GIB = 2**30


def compile_available() -> bool:
    """Whether this build's config schema has train.compile."""
    return "compile" in {f.name for f in dataclasses.fields(TrainConfig)}


NO_GPU = (
    "--device cuda needs a GPU and torch.cuda.is_available() is False here; "
    "use --device cpu --tiny for a smoke run on CPU"
)


# --- the configurations ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One configuration: its config when validate accepts it, else why not (`refused`: validate's
    ConfigError, or `unavailable` in this build)."""

    layout: str
    compile: bool
    cfg: object = None
    status: str = "accepted"
    message: str | None = None

    @property
    def name(self) -> str:
        return f"{self.layout} compile={'on' if self.compile else 'off'}"


def row_overrides(args, layout: str, compiled: bool) -> list[str]:
    zero, offload = LAYOUTS[layout]
    out = [*(TINY if args.tiny else []), *args.overrides]
    out += [f"parallel.zero={zero}", f"parallel.offload={offload}", "train.precision=bf16"]
    out.append(f"dist.backend={'nccl' if args.device == 'cuda' else 'gloo'}")
    if compile_available():  # without the key, compile=off is the only build there is
        out.append(f"train.compile={str(compiled).lower()}")
    return out


def plan(args) -> list[Row]:
    """Every (layout, compile) of the flags, validated for a world of one rank."""
    rows = []
    for layout in args.configs:
        for compiled in args.compile_values:
            row = Row(layout, compiled)
            if compiled and not compile_available():
                row.status, row.message = "unavailable", NO_COMPILE
            else:
                try:
                    row.cfg = validate(load_config(args.config, row_overrides(args, layout, compiled)), 1)
                except ConfigError as e:
                    row.status, row.message = "refused", str(e)
            rows.append(row)
    return rows


def estimate(cfg) -> dict:
    """`dtrain estimate`'s figures for the config at world 1: the device peak and the model states."""
    from dtrain.analysis.estimate import estimate_model_states, peak_device_bytes

    stage = estimate_model_states(copy.deepcopy(cfg), 1, communication=False)["stages"][0]
    return {
        "est_peak_bytes": peak_device_bytes(stage),
        "est_device_states_bytes": sum(stage["device"].values()),
        "est_host_states_bytes": sum(stage["host"].values()),
        "est_activation_bytes": stage["activations"]["total"],
    }


# --- the measurement -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Frees what the last configuration left, and starts the peak counter afresh."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train(cfg, device: torch.device, args) -> dict:
    """Builds the Trainer, runs the warm-up and timed steps; the figures of this configuration."""
    from dtrain.runtime import process_grid
    from dtrain.trainer import Trainer

    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    trainer = Trainer(cfg, process_grid(cfg), device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        started = time.perf_counter()
        result = trainer.train_step()
        synchronize(device)
        elapsed = time.perf_counter() - started
        losses.append(result.loss)
        if i >= args.warmup:
            times.append(elapsed)
        which = (
            f"warm-up {i + 1}/{args.warmup}"
            if i < args.warmup
            else f"step {i - args.warmup + 1}/{args.steps}"
        )
        harness.say(0, f"[bench] {which}: {1e3 * elapsed:.1f} ms")
    median = statistics.median(times)
    tokens_per_s = trainer.global_tokens / median
    held = trainer.held_bytes()
    world = trainer.grid.world_size
    return {
        "step_ms_median": 1e3 * median,
        "step_ms_mean": 1e3 * statistics.fmean(times),
        "tokens_per_s": tokens_per_s,
        # as the trainer logs it: model FLOPs per token x tokens/s over the peak of every rank
        "mfu": trainer.flops_per_token * tokens_per_s / (trainer.peak_flops * world)
        if trainer.peak_flops
        else None,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "baseline_bytes": baseline,
        "held_device_states_bytes": sum(held["device"].values()),
        "held_host_states_bytes": sum(held["host"].values()),
        "losses": losses,
    }


def measure(row: Row, device: torch.device, args) -> dict:
    """The table's row for one configuration: its figures, or why it has none."""
    out = {"config": row.layout, "compile": "on" if row.compile else "off"}
    zero, offload = LAYOUTS[row.layout]
    out |= {"zero": zero, "offload": offload}
    if row.cfg is None:
        return out | {"status": row.status, "message": row.message}
    out |= estimate(row.cfg)
    harness.say(0, f"[bench] {row.name}: {args.warmup} warm-up + {args.steps} timed steps")
    release(device)
    try:
        out |= train(row.cfg, device, args)
    except Exception as e:  # out of memory, a compiler error: reported, never replaced by a number
        first = (str(e).strip().splitlines() or [""])[0]
        return out | {"status": "failed", "message": f"{type(e).__name__}: {first}"}
    finally:
        if row.compile:
            torch._dynamo.reset()  # the next configuration compiles its own model
        release(device)
    if out["peak_bytes"] is not None:
        out["ratio"] = out["peak_bytes"] / out["est_peak_bytes"]
    return out | {"status": "ok"}


# --- the report ------------------------------------------------------------------------------------------


def describe(cfg, device: torch.device, args) -> list[str]:
    from dtrain.model import count_params, flops_per_token
    from dtrain.runtime import peak_flops

    m, t = cfg.model, cfg.train
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(device, t.peak_tflops)
    peak_text = f"peak {peak / 1e12:g} TFLOP/s bf16" if peak else "peak FLOP/s unknown (train.peak_tflops)"
    return [
        "",
        f"== dtrain on one {'GPU' if device.type == 'cuda' else 'CPU process'}: {name}, {peak_text} ==",
        f"{args.config}{' --tiny' if args.tiny else ''}: {count_params(m)['total'] / 1e6:.2f}M parameters, "
        f"d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} vocab={m.vocab_size}, "
        f"{flops_per_token(m, t.seq_len) / 1e9:.3g} GFLOPs/token | global batch {t.global_batch_size} x "
        f"{t.seq_len} tokens, micro-batch {t.micro_batch_size}, bf16, activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}",
        f"{args.warmup} warm-up + {args.steps} timed steps per configuration; step time = median",
    ]


def format_table(summary: dict) -> str:
    rows = summary["rows"]
    biggest = max([r.get("est_peak_bytes", 0) for r in rows] + [0])
    unit, size = ("GiB", GIB) if biggest >= GIB else ("MiB", report.MIB)

    def memory(x) -> str:
        return report.text(x, ".2f", 1 / size)

    lines = [
        *summary["header"],
        "",
        f"{'config':<17}{'compile':<8}{'ms/step':>9}{'tokens/s':>11}{'MFU':>7}"
        f"{f'peak {unit}':>10}{f'estimate {unit}':>14}{'measured/est':>13}"
        f"{f'held {unit}':>10}{'(est.)':>9}",
    ]
    for r in rows:
        head = f"{r['config']:<17}{r['compile']:<8}"
        if r["status"] != "ok":
            estimated = f"estimate {memory(r['est_peak_bytes'])} {unit}; " if "est_peak_bytes" in r else ""
            lines.append(f"{head}{r['status']}: {estimated}{r['message']}")
            continue
        lines.append(
            f"{head}{r['step_ms_median']:>9.1f}{r['tokens_per_s']:>11.0f}{report.text(r['mfu'], '.3f'):>7}"
            f"{memory(r['peak_bytes']):>10}{memory(r['est_peak_bytes']):>14}"
            f"{report.text(r.get('ratio'), '.3f'):>13}"
            f"{memory(r['held_device_states_bytes']):>10}{memory(r['est_device_states_bytes']):>9}"
        )
    lines += report.note(
        "peak: torch.cuda.max_memory_allocated over building, warm-up and timed steps (none on CPU: '-'); "
        "estimate: dtrain estimate's device peak, model states on the device plus the activations kept for "
        "backward (temporary buffers, gathered ZeRO-3 units and the allocator's rounding come on top); held: "
        "the model states the Trainer holds on the device, beside the estimate's."
    )
    return "\n".join(lines)


CSV_KEYS = (
    "config", "zero", "offload", "compile", "status", "step_ms_median", "step_ms_mean", "tokens_per_s",
    "mfu", "peak_bytes", "est_peak_bytes", "ratio", "held_device_states_bytes", "est_device_states_bytes",
    "held_host_states_bytes", "est_host_states_bytes", "est_activation_bytes", "baseline_bytes", "message",
)  # fmt: skip


def csv_rows(summary: dict) -> list[dict]:
    return [{k: r.get(k) for k in CSV_KEYS} for r in summary["rows"]]


# --- the command line ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.gpu",
        description="tokens/s, MFU and peak memory on one GPU for ZeRO 0/3 x offload x compile, "
        "beside dtrain estimate's peak",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every configuration")
    p.add_argument("--config", default="configs/gpu_1b.yaml", help="the config file (the 1B preset)")
    p.add_argument("--configs", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    default_compile = "both" if compile_available() else "off"
    p.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default=default_compile,
        help=f"train.compile rows (default {default_compile})",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (compilation included)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch, for a CPU smoke run")
    p.add_argument("--csv", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    args.configs = [x for x in args.configs.split(",") if x]
    unknown = [x for x in args.configs if x not in LAYOUTS]
    if unknown or not args.configs:
        p.error(f"--configs {','.join(unknown) or '(none)'}: choose from {', '.join(LAYOUTS)}")
    owned = [o for o in args.overrides if o.split("=", 1)[0] in OWNED]
    if owned:
        p.error(f"{owned[0]}: every configuration sets {', '.join(OWNED)} itself; leave it out")
    args.compile_values = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return args


def run(argv=None) -> dict:
    """Checks the device and every configuration, trains each accepted one in turn in a one-rank world;
    prints and returns the table. No GPU with --device cuda, or a bad override: ConfigError, before any
    process group."""
    from dtrain.runtime import init_distributed

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(NO_GPU)
    base = load_config(args.config, [*(TINY if args.tiny else []), *args.overrides, "train.precision=bf16"])
    rows = plan(args)
    accepted = [r for r in rows if r.cfg is not None]
    device, created = torch.device(args.device), False
    if accepted:  # every rank of the world is this process: NCCL on the GPU, Gloo on CPU
        created = not dist.is_initialized()
        device = init_distributed(accepted[0].cfg.dist)
    try:
        summary = {"header": describe(base, device, args), "rows": [measure(r, device, args) for r in rows]}
    finally:
        if created:
            dist.destroy_process_group()
    print(format_table(summary), flush=True)
    if args.csv:
        report.write_csv(args.csv, csv_rows(summary))
    return summary


def main(argv=None) -> int:
    return harness.exit_status(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

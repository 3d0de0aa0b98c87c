"""Our pipeline schedules against the bubble formula and against PyTorch's own, measured in the same run.

    python -m dtrain.bench.pipeline [--pp 2] [--microbatches 8] [--steps 10] [--warmup 2]
        [--schedules gpipe,1f1b,interleaved] [--d-model 256 --n-layers 8 --n-heads 8 --seq-len 128
        --micro-batch 4 --vocab 1024] [--csv out.csv]

For every schedule each rank builds two pipelines from the canonical initial weights, on the same data:

  ours     a dtrain Trainer for parallel.pp=pp with that schedule (interleaved: pp_virtual_stages=2).
  pytorch  the dense dtrain.model.Transformer cut as our Trainer's chunks, as torch.distributed.pipelining
           PipelineStages run by ScheduleGPipe, Schedule1F1B or ScheduleInterleaved1F1B with loss_fn =
           token-loss sum / global tokens and scale_grads=False (our loss and gradients), then our clipping
           and AdamW (harness.TorchSide).

Two steps are untimed: step 0 gives the first-step losses, step 1 counts activations (PyTorch's first step,
which also infers the stage shapes, leaves some saved tensors alive after it returns).

Bubble: every rank adds up the wall time of its chunk forwards (forward hooks, plus PyTorch's loss_fn,
which ours computes inside its last chunk) and of its backwards (torch.autograd.backward, patched: our
executor's B action and PyTorch's stage_backward both go through it, nothing else in a step does). The
pipeline phase runs from the barrier to the end of executor.run / schedule.step on the slowest rank; a
step's bubble is the mean over ranks of 1 - busy / pipeline phase, docs/formulas.md's (p-1)/(m+p-1) for GPipe
and 1F1B; interleaved's (p-1)/(v*m), bubble over ideal time, is x/(1+x) = (p-1)/(v*m+p-1) as an idle share.
simulate() gives the same quantity for the exact action order (F = 1, B = 2, no communication).

Activation memory: in step 1, saved_tensors_hooks track the bytes autograd holds for backward;
docs/formulas.md: GPipe holds all m micro-batches, 1F1B at most p - r on stage r, so GPipe / 1F1B on
rank r is m / (p - r).
The stage outputs both executors keep to call backward on (b*s*h per micro-batch) are not saved tensors.
"""

from __future__ import annotations

import statistics
import time

import torch

from dtrain.bench import harness, report
from dtrain.bench.pipeline_meters import ActivationMeter, Clock, Clocked, time_forwards, timing_backwards
from dtrain.config import d_ff_of
from dtrain.model import TokenCrossEntropy
from dtrain.trainer import build_optimizer
from parallel import pipeline_schedules as ps
from parallel.grid import ProcessGrid
from parallel.sharding import clip_grads_, global_grad_norm

SCHEDULES = ("gpipe", "1f1b", "interleaved")
PYTORCH_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}
LABELS = {"ours": "dtrain (ours)", "pytorch": "PyTorch pipelining"}
VIRTUAL_STAGES = 2  # chunks per rank for the interleaved schedule
UNTIMED, COUNTING_STEP = 2, 1  # step 0: the first-step losses; step 1: the activation count


def virtual_stages(schedule: str) -> int:
    return VIRTUAL_STAGES if schedule == "interleaved" else 1


def formula_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle share of the pipeline phase from docs/formulas.md: (p-1)/(m+p-1) for GPipe and 1F1B; interleaved
    is given as bubble over ideal time (p-1)/(v*m), which as an idle share is (p-1)/(v*m+p-1)."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    over_ideal = (p - 1) / (v * m)
    return over_ideal / (1 + over_ideal)


def simulate_ours(schedule: str, p: int, m: int) -> dict:
    return ps.simulate(ps.build(schedule, p, m, virtual_stages(schedule)), p)


def simulate_order(order, p: int) -> tuple[float | None, str | None]:
    """simulate()'s bubble for PyTorch's own action order (`schedule.pipeline_order`: rank -> list of
    _Action or None), keeping its forwards and full backwards; else None and the reason."""
    if not order:
        return None, "the schedule exposes no pipeline_order"
    schedules = []
    for r in range(p):
        kinds = [(getattr(getattr(a, "computation_type", None), "value", None), a) for a in order.get(r, [])]
        schedules.append(
            [ps.Action(k, a.stage_index, a.microbatch_index) for k, a in kinds if k in ("F", "B")]
        )
    try:
        return ps.simulate(schedules, p)["bubble"], None
    except ps.ScheduleError as e:
        shown = "; ".join(
            f"rank {r}: " + " ".join(str(a) for a in order.get(r, [])[:6]) + " .." for r in range(p)
        )
        return None, f"its pipeline_order is not a runnable order ({e}): {shown}"


class OursPipeline(Clocked, harness.TrainerSide):
    def __init__(self, cfg, grid, clock: Clock):
        super().__init__(cfg, grid)
        self.clock, self.modules = clock, list(self.trainer.model.chunks.values())
        for chunk in self.modules:
            time_forwards(chunk, clock)
        executor = self.trainer.model.executor
        run = executor.run

        def timed_run(*args, **kwargs):  # an instance attribute: this executor only, the library untouched
            try:
                return run(*args, **kwargs)
            finally:
                clock.pipeline_end = time.perf_counter()

        executor.run = timed_run


class TorchPipeline(Clocked, harness.TorchSide):
    """The dense model's chunks, cut as `chunks` (our Trainer's chunks on this rank, by index), as
    torch.distributed.pipelining stages run by PyTorch's schedule class (`clock` None: untimed)."""

    def __init__(self, cfg, grid, schedule: str, chunks: dict, clock: Clock | None):
        from torch.distributed import pipelining

        super().__init__(cfg, loss_group=grid.pp_group)
        self.grid, self.clock, self.modules, stages = grid, clock, [], []
        total = cfg.parallel.pp * virtual_stages(schedule)
        for c, ours in sorted(chunks.items()):
            ids = [int(i) for i in ours.blocks]
            chunk = self.dense(
                block_ids=range(ids[0], ids[-1] + 1),
                has_embedding=ours.embed is not None,
                has_head=ours.head is not None,
            )
            if clock is not None:
                time_forwards(chunk, clock)
            self.modules.append(chunk)
            stages.append(pipelining.PipelineStage(chunk, c, total, torch.device("cpu"), group=grid.pp_group))
        self.first, self.last = any(s.is_first for s in stages), any(s.is_last for s in stages)
        token_loss = TokenCrossEntropy()

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Ours computes the loss inside its last chunk's forward; count it as forward work here too.
            started = time.perf_counter()
            loss = token_loss(logits, targets) / self.global_tokens
            if clock is not None:
                clock.forward += time.perf_counter() - started
            return loss

        m = cfg.train.global_batch_size // cfg.train.micro_batch_size
        self.schedule = getattr(pipelining, PYTORCH_CLASSES[schedule])(
            stages if schedule == "interleaved" else stages[0],
            n_microbatches=m,
            loss_fn=loss_fn,
            scale_grads=False,
        )
        self.order = getattr(self.schedule, "pipeline_order", None)
        self.params = [p for module in self.modules for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(torch.nn.ModuleList(self.modules), cfg.train)

    def forward_backward(self, microbatches: list) -> torch.Tensor:
        args = (torch.cat([x for x, _ in microbatches]),) if self.first else ()
        target = torch.cat([y for _, y in microbatches]) if self.last else None
        losses: list[torch.Tensor] = []
        try:
            self.schedule.step(
                *args, target=target, losses=losses if self.last else None, return_outputs=False
            )
        finally:
            if self.clock is not None:
                self.clock.pipeline_end = time.perf_counter()
        return torch.stack(losses).sum() if losses else torch.zeros(())  # the losses live on the last stage

    def clip(self) -> None:
        grad_norm = global_grad_norm(self.params, pp_group=self.grid.pp_group)
        clip_grads_(self.params, self.cfg.train.grad_clip, grad_norm)


def make_config(args, schedule: str):
    """The config of one schedule: a global batch of `microbatches` micro-batches, no evaluation."""
    layout = [f"parallel.pp={args.pp}", "parallel.dp=1", f"parallel.pp_schedule={schedule}"]
    layout.append(f"parallel.pp_virtual_stages={virtual_stages(schedule)}")
    batch = [
        f"train.global_batch_size={args.microbatches * args.micro_batch}",
        f"train.micro_batch_size={args.micro_batch}",
    ]
    return harness.config_of(args, [*layout, *batch, "train.eval_batches=0"], args.pp)


def count_step(impl, index: int) -> tuple[float, dict | None]:
    if index != COUNTING_STEP:
        return impl.step(index), None
    with ActivationMeter(impl.modules) as meter:
        loss = impl.step(index)
    return loss, (float(meter.peak), float(meter.current))


def _impl_summary(done: harness.Contest, name: str, counted: list) -> dict:
    """Step times, bubbles (per_rank[r][step] = [step s, pipeline s, forward s, backward s]) and every
    rank's activation peak and what was still held after the counting step."""
    step_s, pipe_s, bubble, bubble_step, busy = [], [], [], [], []
    for rows in zip(*done.per_rank[name], strict=True):  # one timed step: every rank's record
        step, pipe = max(row[0] for row in rows), max(row[1] for row in rows)  # the slowest rank
        busies = [row[2] + row[3] for row in rows]
        step_s.append(step)
        pipe_s.append(pipe)
        busy.append(statistics.fmean(busies))
        bubble.append(statistics.fmean(1 - b / pipe for b in busies))
        bubble_step.append(statistics.fmean(1 - b / step for b in busies))
    return done.summary(name) | {
        "pipeline_s": statistics.median(pipe_s),
        "busy_s": statistics.median(busy),
        "bubble": statistics.median(bubble),
        "bubble_step": statistics.median(bubble_step),
        "peak_bytes": [rank[name][0] for rank in counted],
        "held_after_bytes": [rank[name][1] for rank in counted],
    }


def measure_schedule(rank: int, args, grid, clock: Clock, schedule: str) -> dict:
    """Both pipelines of one schedule on every rank; rank 0's result is the schedule's summary."""
    cfg, p, m, v = make_config(args, schedule), args.pp, args.microbatches, virtual_stages(schedule)
    harness.say(rank, f"[bench] {schedule}: building both pipelines (pp={p}, m={m})")
    ours = OursPipeline(cfg, grid, clock)
    builders = {
        "ours": lambda: ours,
        "pytorch": lambda: TorchPipeline(cfg, grid, schedule, ours.trainer.model.chunks, clock),
    }
    done = harness.contest(
        rank, builders, LABELS, args.warmup, args.steps, count_step, UNTIMED, prefix=f"{schedule}: "
    )
    if "ours" in done.errors:
        raise RuntimeError(f"our {schedule} schedule failed: {done.errors['ours']}")
    counted = harness.gather({k: c[COUNTING_STEP] for k, c in done.counted.items()}, p)
    sim = simulate_ours(schedule, p, m)
    row = {"v": v, "formula": formula_bubble(schedule, p, m, v), "simulate": sim["bubble"]}
    row |= {"in_flight": sim["peak_in_flight"], "errors": done.errors}
    row["simulate_pytorch"], row["simulate_pytorch_note"] = simulate_order(
        getattr(done.impls.get("pytorch"), "order", None), p
    )
    row["impls"] = {name: _impl_summary(done, name, counted) for name in done.impls}
    o = row["impls"]["ours"]
    o["formula_pipeline_s"] = o["busy_s"] / (1 - row["formula"])
    if "pytorch" in done.impls:
        row["ratio"] = o["median_s"] / row["impls"]["pytorch"]["median_s"]
        first, theirs = o["losses"][0], row["impls"]["pytorch"]["losses"][0]
        row["loss_rel_diff"], row["loss_gap"] = (
            abs(first - theirs) / abs(theirs),
            done.loss_gap("ours", "pytorch"),
        )
    return row


def measure(rank: int, args) -> dict:
    """Every schedule in turn on every rank, backward calls timed throughout."""
    grid, clock = ProcessGrid(pp=args.pp, dp=1), Clock()
    with timing_backwards(clock):
        rows = {schedule: measure_schedule(rank, args, grid, clock, schedule) for schedule in args.schedules}
    return {"d_ff": d_ff_of(make_config(args, args.schedules[0]).model), "schedules": rows}


def _label(schedule: str, v: int) -> str:
    return f"{schedule} v={v}" if v > 1 else schedule


def format_table(s: dict) -> str:
    c, rows, text = s["config"], s["schedules"], report.text
    p, m = c["pp"], c["microbatches"]
    lines = [
        *harness.banner(
            f"pipeline parallelism: pp={p}, m={m} micro-batches of {c['micro_batch']} x {c['seq_len']} "
            "tokens",
            p,
            f"{report.model_line(c, s['d_ff'])} | {m * c['micro_batch'] * c['seq_len']} tokens/step",
        ),
        f"{c['steps']} timed steps per implementation and schedule after 2 untimed (first-step loss, "
        f"activation count) + {c['warmup']} warm-up, the two alternating; step time = slowest rank",
        "",
        "step time (median ms) and loss: first step, and the largest relative difference over all "
        f"{UNTIMED + c['warmup'] + c['steps']} steps (after updates)",
        f"  {'schedule':<16}{'ours':>9}{'PyTorch':>9}{'ours/PT':>9}{'loss ours':>12}{'loss PT':>12}"
        f"{'rel diff':>10}{'all steps':>11}",
    ]
    for schedule, r in rows.items():
        o, t = r["impls"]["ours"], r["impls"].get("pytorch", {})
        lines.append(
            f"  {_label(schedule, r['v']):<16}{1e3 * o['median_s']:>9.1f}"
            f"{text(t.get('median_s'), '.1f', 1e3):>9}{text(r.get('ratio'), '.3f'):>9}{o['losses'][0]:>12.6f}"
            f"{text(t.get('losses', [None])[0], '.6f'):>12}{text(r.get('loss_rel_diff'), '.1e'):>10}"
            f"{text(r.get('loss_gap'), '.1e'):>11}"
        )
    for schedule, r in rows.items():
        for name, error in r["errors"].items():
            lines.append(f"  {LABELS[name]} {PYTORCH_CLASSES[schedule]}: not done: {error}")
    lines += [
        "",
        "bubble: idle share of the pipeline phase (barrier to the end of the schedule, slowest rank), mean",
        "over ranks; formula from docs/formulas.md as an idle share, interleaved (p-1)/(v*m) converted to",
        "(p-1)/(v*m+p-1); simulate = parallel.pipeline_schedules.simulate (F=1, B=2, no communication)",
        f"  {'schedule':<16}{'formula':>8}{'sim ours':>9}{'sim PT':>8}{'ours':>8}{'PyTorch':>8}{'ours/fm':>8}"
        f"{'PT/fm':>8}{'ours/PT':>8}{'ours step':>10}{'pipe ms':>9}{'fm ms':>8}{'pipe/fm':>8}",
    ]
    notes = []
    for schedule, r in rows.items():
        o, theirs, fm = r["impls"]["ours"], r["impls"].get("pytorch", {}).get("bubble"), r["formula"]
        lines.append(
            f"  {_label(schedule, r['v']):<16}{fm:>8.3f}{r['simulate']:>9.3f}"
            f"{text(r['simulate_pytorch'], '.3f'):>8}{o['bubble']:>8.3f}{text(theirs, '.3f'):>8}"
            f"{o['bubble'] / fm:>8.3f}{text(theirs and theirs / fm, '.3f'):>8}"
            f"{text(theirs and o['bubble'] / theirs, '.3f'):>8}{o['bubble_step']:>10.3f}"
            f"{1e3 * o['pipeline_s']:>9.1f}{1e3 * o['formula_pipeline_s']:>8.1f}"
            f"{o['pipeline_s'] / o['formula_pipeline_s']:>8.3f}"
        )
        if r["simulate_pytorch_note"] and "pytorch" in r["impls"]:
            notes.append(f"  sim PT {schedule}: {PYTORCH_CLASSES[schedule]}: {r['simulate_pytorch_note']}")
    lines += [
        "  ours step = 1 - busy / whole step time (clipping and AdamW count as idle); fm ms = busy time per",
        "  rank / (1 - formula): the pipeline phase the formula predicts for the measured compute",
        *notes,
        "",
        "peak activation memory held for backward per rank (MiB; saved-tensor storages, parameters",
        "excluded), and the GPipe / 1F1B ratio against docs/formulas.md's m / (p - r)",
    ]
    present = [sch for sch in SCHEDULES if sch in rows]
    head = "".join(f"{_label(sch, rows[sch]['v']):>16}" for sch in present)
    lines.append(f"  {'implementation':<20}{'rank':>5}{head}{'gpipe/1f1b':>12}{'m/(p-r)':>9}")
    for name, rank in ((name, rank) for name in LABELS for rank in range(p)):
        peaks = {
            sch: rows[sch]["impls"][name]["peak_bytes"][rank] for sch in present if name in rows[sch]["impls"]
        }
        cells = "".join(f"{report.mib(peaks.get(sch), 2):>16}" for sch in present)
        ratio = peaks["gpipe"] / peaks["1f1b"] if peaks.get("gpipe") and peaks.get("1f1b") else None
        lines.append(f"  {LABELS[name]:<20}{rank:>5}{cells}{text(ratio, '.2f'):>12}{m / (p - rank):>9.2f}")
    flights = "; ".join(f"{_label(sch, rows[sch]['v'])} {rows[sch]['in_flight']}" for sch in present)
    held = [b for r in rows.values() for impl in r["impls"].values() for b in impl["held_after_bytes"]]
    lines += [
        f"  in flight per rank (simulate, chunk micro-batches): {flights}",
        f"  still held at the end of the counting step (should be 0): {max(held, default=0):.0f} B",
    ]
    return "\n".join(lines)


def csv_rows(s: dict) -> list[dict]:
    """One summary row per schedule and implementation (one not done: its error)."""
    config = report.subset(
        s["config"], "pp microbatches d_model n_layers n_heads seq_len micro_batch vocab steps"
    )
    out = []
    for schedule, r in s["schedules"].items():
        figures = report.flat(
            {k: r.get(k) for k in ("formula", "simulate", "simulate_pytorch", "ratio", "loss_gap")}
        )
        for name in LABELS:
            impl = report.flat(r["impls"].get(name, {})) | {"error": r["errors"].get(name, "")}
            out.append(config | {"schedule": schedule, "impl": name} | figures | impl)
    return out


def add_arguments(p) -> None:
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (m)")
    p.add_argument(
        "--schedules", default=",".join(SCHEDULES), help=f"comma-separated subset of {','.join(SCHEDULES)}"
    )


def check(p, args) -> None:
    names = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if not names or any(s not in SCHEDULES for s in names):
        p.error(f"--schedules {args.schedules!r}: choose from {', '.join(SCHEDULES)}")
    args.schedules = list(dict.fromkeys(names))


def configs(args) -> list:
    return [make_config(args, schedule) for schedule in args.schedules]


parse_args, run, main = harness.commands(
    __name__,
    "dtrain's pipeline schedules against the bubble formula and PyTorch's, in one run",
    "--pp",
    "pipelining",
    steps=10,
    warmup=2,
    model={"n_layers": 8, "seq_len": 128, "batch": ("--micro-batch", 4, "rows per micro-batch")},
)

if __name__ == "__main__":
    raise SystemExit(main())

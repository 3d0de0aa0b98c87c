"""Our pipeline schedules against the bubble formula and against PyTorch's own, measured in the same run.

    python -m dtrain.bench.pipeline [--pp 2] [--microbatches 8] [--steps 10] [--warmup 2]
        [--schedules gpipe,1f1b,interleaved] [--d-model 256 --n-layers 8 --n-heads 8 --seq-len 128
        --micro-batch 4 --vocab 1024] [--csv out.csv]

The command spawns a Gloo world of `pp` CPU processes (cpu_count // pp threads each). For every schedule
it builds, on every rank, two pipelines of one config with the same canonical initial weights
(dtrain.model.init_weights) and runs them on the same data (dtrain.data, the global batch of each step):

  ours     a dtrain Trainer for parallel.pp=pp with that schedule (interleaved: pp_virtual_stages=2) on a
           ProcessGrid(pp=pp, dp=1); a step is Trainer.train_step (schedule, clipping, AdamW).
  pytorch  the dense dtrain.model.Transformer cut into the same chunks (block_ids, has_embedding,
           has_head; chunk c on rank c % pp) as torch.distributed.pipelining PipelineStages, run by
           ScheduleGPipe, Schedule1F1B or ScheduleInterleaved1F1B with loss_fn = token-loss sum / tokens
           in the global batch and scale_grads=False, so it computes our loss and gradients; then the same
           global gradient-norm clipping and the same AdamW at the same learning rate
           (dtrain.bench.pipeline_pytorch).

The two implementations alternate step by step, each step timed with time.perf_counter after a barrier; a
step lasts as long as its slowest rank. The first two steps of each are not timed: step 0 gives the
first-step losses, which must agree, and step 1 counts activation memory (PyTorch's first step, which
also infers the stage shapes, leaves some saved tensors alive after it returns, so it is not counted).

Bubble (dtrain.bench.pipeline_bubble). Every rank adds up the wall time of its chunk forwards (forward hooks
on the chunk modules, plus PyTorch's loss_fn, which ours computes inside its last chunk) and of its
backwards (every call of torch.autograd.backward, patched in the benchmark processes: our executor's B
action and PyTorch's stage_backward both go through it, and nothing else in a step does). The pipeline phase
is the span from the barrier to the end of executor.run / schedule.step on the slowest rank; the measured
bubble of a step is the mean over ranks of 1 - busy / pipeline phase, the idle share FORMULAS.md gives as
(p-1)/(m+p-1) for GPipe and 1F1B. Interleaved 1F1B is given there as bubble over ideal time (p-1)/(v*m); as
an idle share that is x/(1+x) = (p-1)/(v*m+p-1). `simulate()`'s figure is the same quantity for the exact
action order (F = 1, B = 2 per chunk, no communication), for our order and for PyTorch's. The whole-step
bubble (1 - busy / step time) also counts gradient clipping and the optimizer step as idle.

Activation memory (dtrain.bench.pipeline_activations). During the counting step (step 1),
torch.autograd.graph.saved_tensors_hooks tracks the bytes autograd holds for backward: a pack adds the
storage of the saved tensor (counted once however many ops save it; parameters and buffers excluded), and
the packed handle's release (when backward frees the graph of a micro-batch) subtracts it. The peak of that
running total is the activation memory the schedule holds. FORMULAS.md: GPipe holds all m micro-batches,
1F1B at most p - r on stage r, so the expected GPipe / 1F1B ratio on rank r is m / (p - r). Activations that
autograd does not save (the stage outputs both executors keep to call backward on, b*s*h per micro-batch)
are not in the count.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time

import torch
import torch.distributed as dist

from dtrain.bench.cli import add_model_args, check_world, config_of, exit_status
from dtrain.bench.pipeline_activations import ActivationMeter, storage_pointers
from dtrain.bench.pipeline_bubble import CLOCK, SCHEDULES, BackwardTimer, time_forwards, virtual_stages
from dtrain.bench.pipeline_pytorch import PYTORCH_CLASSES, PyTorchPipeline
from dtrain.bench.pipeline_report import LABELS, csv_rows, format_table, summarise
from dtrain.bench.report import publish
from dtrain.bench.timing import after_barrier, alternate
from dtrain.bench.world import gather, say, spawn

# Untimed steps before warm-up: step 0 gives the first-step losses, step 1 counts activations (PyTorch's
# first step, which also infers the stage shapes, leaves some saved tensors alive after it returns).
UNTIMED, COUNTING_STEP = 2, 1


def make_config(args, schedule: str):
    """The config of one schedule: a global batch of `microbatches` micro-batches, no evaluation."""
    return config_of(
        args,
        [
            f"parallel.pp={args.pp}",
            "parallel.dp=1",
            f"parallel.pp_schedule={schedule}",
            f"parallel.pp_virtual_stages={virtual_stages(schedule)}",
            f"train.global_batch_size={args.microbatches * args.micro_batch}",
            f"train.micro_batch_size={args.micro_batch}",
            "train.eval_batches=0",
        ],
        args.pp,
    )


class Ours:
    """dtrain's Trainer; `step()` runs Trainer.train_step and returns the loss."""

    def __init__(self, cfg, grid):
        from dtrain.trainer import Trainer

        self.trainer = Trainer(cfg, grid, torch.device("cpu"))
        self.modules = list(self.trainer.model.chunks.values())
        for chunk in self.modules:
            time_forwards(chunk)
        executor = self.trainer.model.executor
        run = executor.run

        def timed_run(*args, **kwargs):  # instance attribute: this executor only, the library untouched
            try:
                return run(*args, **kwargs)
            finally:
                CLOCK.pipeline_end = time.perf_counter()

        executor.run = timed_run
        self.order = None  # our order is parallel.pipeline_schedules' (simulate_ours)

    def step(self, index: int) -> float:
        assert self.trainer.step == index, (self.trainer.step, index)
        return self.trainer.train_step().loss


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def timed_step(impl, index: int) -> tuple[float, list[float]]:
    """One step after a barrier: its loss and this rank's [step, pipeline phase, forward, backward] (s)."""
    CLOCK.reset()
    loss, started, ended = after_barrier(impl.step, index)
    return loss, [ended - started, CLOCK.pipeline_end - started, CLOCK.forward, CLOCK.backward]


def _ok_everywhere(ok: bool) -> bool:
    """Whether every rank succeeded: one rank's failure must stop all of them, or the others would wait in
    the next collective until the Gloo timeout."""
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag)
    return float(flag) == 0.0


def measure_schedule(rank: int, args, grid, schedule: str) -> dict:
    """One schedule on every rank: both pipelines built, the two untimed steps (first-step loss, activation
    count), then warm-up and timed steps, alternating; returns every rank's records (on every rank)."""
    cfg = make_config(args, schedule)
    pp = args.pp
    impls, errors = {"ours": Ours(cfg, grid)}, {}
    try:
        built = PyTorchPipeline(cfg, grid, schedule)
    except Exception as e:  # reported as not done, never replaced by a number
        built, errors["pytorch"] = None, _error(e)
    if _ok_everywhere(built is not None):
        impls["pytorch"] = built
    else:
        errors.setdefault("pytorch", "could not be built on another rank")
        say(rank, f"[bench] {schedule}: PyTorch {PYTORCH_CLASSES[schedule]} not built: {errors['pytorch']}")

    losses: dict[str, list[float]] = {name: [] for name in impls}
    peaks: dict[str, list[float]] = {}
    held: dict[str, list[float]] = {}
    for index in range(UNTIMED):
        for name in list(impls):
            impl = impls[name]
            meter = ActivationMeter(storage_pointers(impl.modules)) if index == COUNTING_STEP else None
            try:
                with meter or contextlib.nullcontext():
                    loss, _ = timed_step(impl, index)
                ok = True
            except Exception as e:
                ok, errors[name] = False, _error(e)
            if not _ok_everywhere(ok):
                errors.setdefault(name, "failed on another rank")
                say(rank, f"[bench] {schedule}: {LABELS[name]} failed: {errors[name]}")
                del impls[name], losses[name]
                if name == "ours":
                    raise RuntimeError(f"our {schedule} schedule failed: {errors['ours']}")
                continue
            losses[name].append(loss)
            if meter is not None:
                peaks[name] = [row[0] for row in gather([float(meter.peak)], pp)]
                held[name] = [row[0] for row in gather([float(meter.current)], pp)]
        what = "first-step loss" if index == 0 else "activation count"
        say(
            rank,
            f"[bench] {schedule}: untimed step {index + 1} ({what}) "
            + ", ".join(f"{LABELS[k]} loss {v[-1]:.6f}" for k, v in losses.items()),
        )

    timed = {name: functools.partial(timed_step, impl) for name, impl in impls.items()}
    records = alternate(
        rank, timed, losses, args.warmup, args.steps, LABELS, first_index=UNTIMED, prefix=f"{schedule}: "
    )
    # Every rank's records, for the bubble (a mean over ranks) and the slowest rank's step time.
    per_rank = {name: gather([x for r in rows for x in r], pp) for name, rows in records.items()}
    return {
        "errors": errors,
        "losses": losses,
        "peaks": peaks,
        "held": held,
        "per_rank": {
            k: [[row[j : j + 4] for j in range(0, len(row), 4)] for row in v] for k, v in per_rank.items()
        },
        "pytorch_order": getattr(impls.get("pytorch"), "order", None),
    }


def measure(rank: int, args) -> dict:
    """Runs on every rank of an initialised world: every schedule in turn, backward calls timed throughout."""
    from parallel.grid import ProcessGrid

    grid = ProcessGrid(pp=args.pp, dp=1)
    out = {}
    with BackwardTimer():
        for schedule in args.schedules:
            say(rank, f"[bench] {schedule}: building both pipelines (pp={args.pp}, m={args.microbatches})")
            out[schedule] = measure_schedule(rank, args, grid, schedule)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.pipeline",
        description="dtrain's pipeline schedules against the bubble formula and PyTorch's, in one run",
    )
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks (processes spawned)")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (m)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation and schedule")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before (after the counting step)")
    p.add_argument(
        "--schedules", default=",".join(SCHEDULES), help="comma-separated subset of " + ",".join(SCHEDULES)
    )
    add_model_args(p, n_layers=8, seq_len=128, batch=("--micro-batch", 4, "rows per micro-batch"))
    p.add_argument("--timeout", type=float, default=300.0, help="Gloo timeout (s): a hung schedule fails")
    p.add_argument("--csv", default=None, help="also write one summary row per schedule and implementation")
    args = p.parse_args(argv)
    check_world(p, args, args.pp, "--pp", "pipelining")
    names = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEDULES]
    if bad or not names:
        p.error(f"--schedules {args.schedules!r}: choose from {', '.join(SCHEDULES)}")
    args.schedules = list(dict.fromkeys(names))
    return args


def run(argv=None) -> dict:
    """Spawn the pp ranks, measure every schedule of both implementations, print the tables (rank 0's
    results) and return the summary."""
    from dtrain.config import d_ff_of

    args = parse_args(argv)
    # A bad config fails here, before any process starts.
    cfgs = [make_config(args, schedule) for schedule in args.schedules]
    summary = summarise(args, spawn(measure, args, args.pp, args.timeout), d_ff_of(cfgs[0].model))
    return publish(summary, format_table, csv_rows, args.csv)


def main(argv=None) -> int:
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())

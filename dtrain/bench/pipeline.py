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
           global gradient-norm clipping and the same AdamW at the same learning rate.

The two implementations alternate step by step, each step timed with time.perf_counter after a barrier; a
step lasts as long as its slowest rank. The first two steps of each are not timed: step 0 gives the
first-step losses, which must agree, and step 1 counts activation memory (PyTorch's first step, which
also infers the stage shapes, leaves some saved tensors alive after it returns, so it is not counted).

Bubble. Every rank adds up the wall time of its chunk forwards (forward hooks on the chunk modules, plus
PyTorch's loss_fn, which ours computes inside its last chunk) and of its backwards (every call of
torch.autograd.backward, patched in the benchmark processes: our executor's B action and PyTorch's
stage_backward both go through it, and nothing else in a step does). The pipeline phase is the span from
the barrier to the end of executor.run / schedule.step on the slowest rank; the measured bubble of a step
is the mean over ranks of 1 - busy / pipeline phase, the idle share FORMULAS.md gives as
(p-1)/(m+p-1) for GPipe and 1F1B. Interleaved 1F1B is given there as bubble over ideal time (p-1)/(v*m);
as an idle share that is x/(1+x) = (p-1)/(v*m+p-1). `simulate()`'s figure is the same quantity for the
exact action order (F = 1, B = 2 per chunk, no communication), for our order and for PyTorch's. The
whole-step bubble (1 - busy / step time) also counts gradient clipping and the optimizer step as idle.

Activation memory. During the counting step (step 1), torch.autograd.graph.saved_tensors_hooks tracks the
bytes autograd holds for backward: a pack adds the storage of the saved tensor (counted once however many ops
save it; parameters and buffers excluded), and the packed handle's release (when backward frees the
graph of a micro-batch) subtracts it. The peak of that running total is the activation memory the schedule
holds. FORMULAS.md: GPipe holds all m micro-batches, 1F1B at most p - r on stage r, so the expected GPipe /
1F1B ratio on rank r is m / (p - r). Activations that autograd does not save (the stage outputs both
executors keep to call backward on, b*s*h per micro-batch) are not in the count.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.bench.tensor_parallel import _free_port, _say

SCHEDULES = ("gpipe", "1f1b", "interleaved")
VIRTUAL_STAGES = 2  # chunks per rank for the interleaved schedule
IMPLS = ("ours", "pytorch")
# Untimed steps before warm-up: step 0 gives the first-step losses, step 1 counts activations (PyTorch's
# first step, which also infers the stage shapes, leaves some saved tensors alive after it returns).
UNTIMED, COUNTING_STEP = 2, 1
LABELS = {"ours": "dtrain (ours)", "pytorch": "PyTorch pipelining"}
PYTORCH_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


def threads_per_rank(pp: int) -> int:
    return max(1, (os.cpu_count() or 1) // pp)


def virtual_stages(schedule: str) -> int:
    return VIRTUAL_STAGES if schedule == "interleaved" else 1


# --------------------------------------------------------------------------------------------------------
# The formulas
# --------------------------------------------------------------------------------------------------------


def formula_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle share of the pipeline phase from FORMULAS.md: (p-1)/(m+p-1) for GPipe and 1F1B; interleaved
    is given as bubble over ideal time (p-1)/(v*m), which as an idle share is (p-1)/(v*m+p-1)."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    over_ideal = (p - 1) / (v * m)
    return over_ideal / (1 + over_ideal)


def simulate_ours(schedule: str, p: int, m: int) -> dict:
    from parallel import pipeline_schedules as ps

    return ps.simulate(ps.build(schedule, p, m, virtual_stages(schedule)), p)


def simulate_order(order, p: int) -> tuple[float | None, str | None]:
    """simulate()'s bubble for PyTorch's own action order (`schedule.pipeline_order`: rank -> list of
    _Action or None), keeping its forwards and full backwards; else None and the reason."""
    from parallel import pipeline_schedules as ps

    if not order:
        return None, "the schedule exposes no pipeline_order"
    schedules = []
    for r in range(p):
        actions = []
        for a in order.get(r, []):
            kind = getattr(getattr(a, "computation_type", None), "value", None)
            if kind in ("F", "B"):
                actions.append(ps.Action(kind, a.stage_index, a.microbatch_index))
        schedules.append(actions)
    try:
        return ps.simulate(schedules, p)["bubble"], None
    except ps.ScheduleError as e:
        shown = "; ".join(
            f"rank {r}: " + " ".join(str(a) for a in order.get(r, [])[:6]) + " .." for r in range(p)
        )
        return None, f"its pipeline_order is not a runnable order ({e}): {shown}"


# --------------------------------------------------------------------------------------------------------
# Measuring busy time and activation memory
# --------------------------------------------------------------------------------------------------------


@dataclass
class Clock:
    """Busy time of this rank in the current step (seconds)."""

    forward: float = 0.0
    backward: float = 0.0
    pipeline_end: float = 0.0
    _started: list[float] = field(default_factory=list)
    _depth: int = 0

    def reset(self) -> None:
        self.forward = self.backward = self.pipeline_end = 0.0
        self._started.clear()

    @property
    def busy(self) -> float:
        return self.forward + self.backward


CLOCK = Clock()


def time_forwards(module: torch.nn.Module) -> None:
    """Add the wall time of every call of `module` to CLOCK.forward (hooks stay for the process life)."""

    def pre(*_):
        CLOCK._started.append(time.perf_counter())

    def post(*_):
        CLOCK.forward += time.perf_counter() - CLOCK._started.pop()

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


class BackwardTimer:
    """Patches torch.autograd.backward and torch.autograd.grad, in this process, to add their wall time to
    CLOCK.backward (nested calls counted once). Our executor calls torch.autograd.backward (directly or
    through Tensor.backward) and PyTorch's stage_backward does too, both resolving the module attribute at
    call time; the originals are restored on exit."""

    NAMES = ("backward", "grad")

    def __enter__(self) -> BackwardTimer:
        self._saved = {name: getattr(torch.autograd, name) for name in self.NAMES}
        for name, fn in self._saved.items():
            setattr(torch.autograd, name, self._wrap(fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(torch.autograd, name, fn)

    @staticmethod
    def _wrap(fn):
        def timed(*args, **kwargs):
            CLOCK._depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                CLOCK._depth -= 1
                if CLOCK._depth == 0:
                    CLOCK.backward += time.perf_counter() - started

        timed.__wrapped__ = fn
        return timed


class _Saved:
    """What a pack hook hands autograd: the tensor, plus a release that runs when autograd drops it."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: torch.Tensor, meter: ActivationMeter | None, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        if self.meter is not None:
            self.meter._release(self.key)


class ActivationMeter:
    """Bytes of tensor storage autograd holds for backward while active: running total and peak.

    A storage saved by several ops (or through several views) counts once, while any of its saves is
    alive; parameter and buffer storages (`exclude`, data pointers) are not activations and are skipped."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage pointer -> [saves alive, bytes]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a tensor subclass)
            return _Saved(t, None, None)
        if key == 0 or key in self.exclude:
            return _Saved(t, None, None)
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]
            self.current -= entry[1]

    def __enter__(self) -> ActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def storage_pointers(modules) -> set[int]:
    out = set()
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            out.add(t.untyped_storage().data_ptr())
    return out


# --------------------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------------------


def make_config(args, schedule: str):
    from dtrain.config import load_config, validate

    overrides = [
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}",
        "model.dropout=0.0",
        f"parallel.pp={args.pp}",
        "parallel.dp=1",
        f"parallel.pp_schedule={schedule}",
        f"parallel.pp_virtual_stages={virtual_stages(schedule)}",
        f"train.seq_len={args.seq_len}",
        f"train.global_batch_size={args.microbatches * args.micro_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.seed={args.seed}",
        "train.eval_batches=0",
    ]
    return validate(load_config(None, overrides), args.pp)


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


class PyTorchPipeline:
    """The dense model's chunks as torch.distributed.pipelining stages, run by PyTorch's schedule."""

    def __init__(self, cfg, grid, schedule: str):
        from torch.distributed import pipelining

        from dtrain.data import build_dataset
        from dtrain.model import TokenCrossEntropy, Transformer, init_weights
        from dtrain.stage import balanced_split, n_chunks
        from dtrain.trainer import build_optimizer

        self.cfg, self.grid = cfg, grid
        t = cfg.train
        pp, rank = cfg.parallel.pp, grid.coords.pp
        total = n_chunks(cfg)
        self.global_tokens = t.global_batch_size * t.seq_len
        self.modules, stages = [], []
        for c, block_ids in enumerate(balanced_split(cfg.model.n_layers, total)):
            if c % pp != rank:
                continue
            chunk = Transformer(cfg.model, block_ids=block_ids, has_embedding=c == 0, has_head=c == total - 1)
            init_weights(chunk, t.seed)  # the same canonical weights as ours
            chunk.train()
            time_forwards(chunk)
            self.modules.append(chunk)
            stages.append(pipelining.PipelineStage(chunk, c, total, torch.device("cpu"), group=grid.pp_group))
        self.first = any(s.is_first for s in stages)
        self.last = any(s.is_last for s in stages)
        token_loss = TokenCrossEntropy()

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Ours computes the loss inside its last chunk's forward; count it as forward work here too.
            started = time.perf_counter()
            loss = token_loss(logits, targets) / self.global_tokens
            CLOCK.forward += time.perf_counter() - started
            return loss

        cls = getattr(pipelining, PYTORCH_CLASSES[schedule])
        m = t.global_batch_size // t.micro_batch_size
        stage_arg = stages if schedule == "interleaved" else stages[0]
        self.schedule = cls(stage_arg, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
        self.order = getattr(self.schedule, "pipeline_order", None)
        self.params = [p for module in self.modules for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(torch.nn.ModuleList(self.modules), t)
        self.data = build_dataset(cfg, "train")

    def step(self, index: int) -> float:
        from dtrain.data import rank_microbatches
        from dtrain.trainer import lr_at
        from parallel.sharding import clip_grads_, global_grad_norm

        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(index, t)
        mbs = rank_microbatches(self.data, index, 0, 1, t.micro_batch_size, t.global_batch_size)
        args = (torch.cat([x for x, _ in mbs]),) if self.first else ()
        target = torch.cat([y for _, y in mbs]) if self.last else None
        losses: list[torch.Tensor] = []
        try:
            self.schedule.step(
                *args, target=target, losses=losses if self.last else None, return_outputs=False
            )
        finally:
            CLOCK.pipeline_end = time.perf_counter()
        grad_norm = global_grad_norm(self.params, pp_group=self.grid.pp_group)
        clip_grads_(self.params, t.grad_clip, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros(())
        dist.all_reduce(loss, group=self.grid.pp_group)  # the losses live on the last stage
        return float(loss)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def timed_step(impl, index: int) -> tuple[float, list[float]]:
    """One step after a barrier: its loss and this rank's [step, pipeline phase, forward, backward] (s)."""
    dist.barrier()
    CLOCK.reset()
    started = time.perf_counter()
    loss = impl.step(index)
    ended = time.perf_counter()
    return loss, [ended - started, CLOCK.pipeline_end - started, CLOCK.forward, CLOCK.backward]


def _gather(values: list, size: int) -> list:
    """Every rank's list of floats (equal lengths), gathered on every rank."""
    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _ok_everywhere(ok: bool) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag)
    return float(flag) == 0.0


def measure_schedule(rank: int, args, grid, schedule: str) -> dict:
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
        _say(rank, f"[bench] {schedule}: PyTorch {PYTORCH_CLASSES[schedule]} not built: {errors['pytorch']}")

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
                _say(rank, f"[bench] {schedule}: {LABELS[name]} failed: {errors[name]}")
                del impls[name], losses[name]
                if name == "ours":
                    raise RuntimeError(f"our {schedule} schedule failed: {errors['ours']}")
                continue
            losses[name].append(loss)
            if meter is not None:
                peaks[name] = [row[0] for row in _gather([float(meter.peak)], pp)]
                held[name] = [row[0] for row in _gather([float(meter.current)], pp)]
        what = "first-step loss" if index == 0 else "activation count"
        _say(
            rank,
            f"[bench] {schedule}: untimed step {index + 1} ({what}) "
            + ", ".join(f"{LABELS[k]} loss {v[-1]:.6f}" for k, v in losses.items()),
        )

    records: dict[str, list[list[float]]] = {name: [] for name in impls}
    for i in range(args.warmup + args.steps):
        for name, impl in impls.items():  # alternate, so drift and noise hit both alike
            loss, record = timed_step(impl, UNTIMED + i)
            losses[name].append(loss)
            if i >= args.warmup:
                records[name].append(record)
        if i < args.warmup:
            _say(rank, f"[bench] {schedule}: warm-up {i + 1}/{args.warmup}")
        else:
            now = "  ".join(f"{LABELS[k]} {1e3 * v[-1][0]:8.1f} ms" for k, v in records.items())
            _say(rank, f"[bench] {schedule}: step {i - args.warmup + 1}/{args.steps}  {now}  (rank 0)")
    per_rank = {name: _gather([x for r in rows for x in r], pp) for name, rows in records.items()}
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
    from parallel.grid import ProcessGrid

    grid = ProcessGrid(pp=args.pp, dp=1)
    out = {}
    with BackwardTimer():
        for schedule in args.schedules:
            _say(rank, f"[bench] {schedule}: building both pipelines (pp={args.pp}, m={args.microbatches})")
            out[schedule] = measure_schedule(rank, args, grid, schedule)
    return out


def _worker(rank: int, args, port: int, result_path: str) -> None:
    torch.set_num_threads(threads_per_rank(args.pp))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.pp,
        timeout=timedelta(seconds=args.timeout),
    )
    try:
        out = measure(rank, args)
        if rank == 0:
            with open(result_path, "wb") as f:  # a file, not a pipe: no size limit while we join
                pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


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
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=300.0, help="Gloo timeout (s): a hung schedule fails")
    p.add_argument("--csv", default=None, help="also write one summary row per schedule and implementation")
    args = p.parse_args(argv)
    if args.pp < 2:
        p.error(f"--pp {args.pp}: pipelining needs at least 2 ranks")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    names = [s.strip() for s in args.schedules.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEDULES]
    if bad or not names:
        p.error(f"--schedules {args.schedules!r}: choose from {', '.join(SCHEDULES)}")
    args.schedules = list(dict.fromkeys(names))
    return args


def run(argv=None) -> dict:
    """Spawn the world, measure, print the table (rank 0's results) and return the summary."""
    args = parse_args(argv)
    for schedule in args.schedules:
        make_config(args, schedule)  # a bad config fails here, before any process starts
    print(f"[bench] spawning {args.pp} Gloo processes, {threads_per_rank(args.pp)} threads each", flush=True)
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        result_path = os.path.join(tmp, "rank0.pkl")
        mp.start_processes(
            _worker, args=(args, _free_port(), result_path), nprocs=args.pp, join=True, start_method="spawn"
        )
        with open(result_path, "rb") as f:
            raw = pickle.load(f)
    summary = summarise(args, raw)
    print(format_table(summary), flush=True)
    if args.csv:
        write_csv(args.csv, summary)
        print(f"[bench] wrote {args.csv}", flush=True)
    return summary


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _impl_summary(per_rank: list[list[list[float]]], losses: list[float], peaks: list[float]) -> dict:
    """per_rank[r][step] = [step s, pipeline s, forward s, backward s] of rank r."""
    n_ranks, n_steps = len(per_rank), len(per_rank[0])
    step_s, pipe_s, bubble, bubble_step, busy = [], [], [], [], []
    for i in range(n_steps):
        rows = [per_rank[r][i] for r in range(n_ranks)]
        step, pipe = max(row[0] for row in rows), max(row[1] for row in rows)  # the slowest rank
        busies = [row[2] + row[3] for row in rows]
        step_s.append(step)
        pipe_s.append(pipe)
        busy.append(statistics.fmean(busies))
        bubble.append(statistics.fmean(1 - b / pipe for b in busies))
        bubble_step.append(statistics.fmean(1 - b / step for b in busies))
    return {
        "median_s": statistics.median(step_s),
        "mean_s": statistics.fmean(step_s),
        "pipeline_s": statistics.median(pipe_s),
        "busy_s": statistics.median(busy),
        "bubble": statistics.median(bubble),
        "bubble_step": statistics.median(bubble_step),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_bytes": peaks,
    }


def summarise(args, raw: dict) -> dict:
    from dtrain.config import d_ff_of

    p, m = args.pp, args.microbatches
    rows = {}
    for schedule, r in raw.items():
        v = virtual_stages(schedule)
        sim = simulate_ours(schedule, p, m)
        row = {
            "v": v,
            "formula": formula_bubble(schedule, p, m, v),
            "simulate": sim["bubble"],
            "in_flight": sim["peak_in_flight"],
            "errors": r["errors"],
            "impls": {},
        }
        row["simulate_pytorch"], row["simulate_pytorch_note"] = simulate_order(r["pytorch_order"], p)
        for name, per_rank in r["per_rank"].items():
            row["impls"][name] = _impl_summary(per_rank, r["losses"][name], r["peaks"][name])
            row["impls"][name]["held_after_bytes"] = r["held"][name]
        impls = row["impls"]
        if "ours" in impls:
            o = impls["ours"]
            o["formula_pipeline_s"] = o["busy_s"] / (1 - row["formula"])
        if {"ours", "pytorch"} <= set(impls):
            o, t = impls["ours"], impls["pytorch"]
            row["ratio"] = o["median_s"] / t["median_s"]
            row["loss_rel_diff"] = abs(o["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
        rows[schedule] = row
    cfg = make_config(args, args.schedules[0])
    return {"config": vars(args), "d_ff": d_ff_of(cfg.model), "schedules": rows}


def _label(schedule: str, v: int) -> str:
    return f"{schedule} v={v}" if v > 1 else schedule


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def _frac(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(s: dict) -> str:
    c = s["config"]
    p, m = c["pp"], c["microbatches"]
    rows = s["schedules"]
    tokens = c["microbatches"] * c["micro_batch"] * c["seq_len"]
    lines = [
        "",
        f"== pipeline parallelism: pp={p}, m={m} micro-batches of {c['micro_batch']} x {c['seq_len']} tokens "
        f"| Gloo on CPU, {threads_per_rank(p)} thread(s) per rank ==",
        f"model d_model={c['d_model']} n_layers={c['n_layers']} n_heads={c['n_heads']} d_ff={s['d_ff']} "
        f"vocab={c['vocab']} | {tokens} tokens/step",
        f"{c['steps']} timed steps per implementation and schedule after 2 untimed (first-step loss, "
        f"activation count) + {c['warmup']} warm-up, the two alternating; step time = slowest rank",
        "",
        "step time (median ms) and first-step loss",
        f"  {'schedule':<16}{'ours':>9}{'PyTorch':>9}{'ours/PT':>9}{'loss ours':>12}{'loss PT':>12}"
        f"{'rel diff':>10}",
    ]
    for schedule, r in rows.items():
        o, t = r["impls"].get("ours"), r["impls"].get("pytorch")
        loss_o = f"{o['first_loss']:.6f}" if o else "-"
        loss_t = f"{t['first_loss']:.6f}" if t else "-"
        diff = f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else "-"
        lines.append(
            f"  {_label(schedule, r['v']):<16}{_ms(o and o['median_s']):>9}{_ms(t and t['median_s']):>9}"
            f"{_frac(r.get('ratio')):>9}{loss_o:>12}{loss_t:>12}{diff:>10}"
        )
    for schedule, r in rows.items():
        for name, error in r["errors"].items():
            lines.append(
                f"  {LABELS[name]} {PYTORCH_CLASSES[schedule] if name == 'pytorch' else schedule}: "
                f"not done: {error}"
            )
    lines += [
        "",
        "bubble: idle share of the pipeline phase (barrier to the end of the schedule, slowest rank), mean",
        "over ranks; formula from FORMULAS.md as an idle share, interleaved (p-1)/(v*m) converted to",
        "(p-1)/(v*m+p-1); simulate = parallel.pipeline_schedules.simulate (F=1, B=2, no communication)",
        f"  {'schedule':<16}{'formula':>8}{'sim ours':>9}{'sim PT':>8}{'ours':>8}{'PyTorch':>8}{'ours/fm':>8}"
        f"{'PT/fm':>8}{'ours/PT':>8}{'ours step':>10}{'pipe ms':>9}{'fm ms':>8}{'pipe/fm':>8}",
    ]
    notes = []
    for schedule, r in rows.items():
        o, t = r["impls"].get("ours"), r["impls"].get("pytorch")
        fm = r["formula"]
        ob, tb = o and o["bubble"], t and t["bubble"]
        cells = [
            (8, f"{fm:.3f}"),
            (9, f"{r['simulate']:.3f}"),
            (8, _frac(r["simulate_pytorch"])),
            (8, _frac(ob)),
            (8, _frac(tb)),
            (8, _frac(_ratio(ob, fm))),
            (8, _frac(_ratio(tb, fm))),
            (8, _frac(_ratio(ob, tb))),
            (10, _frac(o and o["bubble_step"])),
            (9, _ms(o and o["pipeline_s"])),
            (8, _ms(o and o["formula_pipeline_s"])),
            (8, _frac(_ratio(o and o["pipeline_s"], o and o["formula_pipeline_s"]))),
        ]
        lines.append(f"  {_label(schedule, r['v']):<16}" + "".join(f"{text:>{w}}" for w, text in cells))
        if r["simulate_pytorch_note"] and "pytorch" in r["impls"]:
            notes.append(f"  sim PT {schedule}: {PYTORCH_CLASSES[schedule]}: {r['simulate_pytorch_note']}")
    lines += [
        "  ours step = 1 - busy / whole step time (clipping and AdamW count as idle); fm ms = busy time per",
        "  rank / (1 - formula): the pipeline phase the formula predicts for the measured compute",
        *notes,
        "",
        "peak activation memory held for backward per rank (MiB; saved-tensor storages, parameters",
        "excluded), and the GPipe / 1F1B ratio against FORMULAS.md's m / (p - r)",
    ]
    present = [sch for sch in SCHEDULES if sch in rows]
    head = "".join(f"{_label(sch, rows[sch]['v']):>16}" for sch in present)
    lines.append(f"  {'implementation':<20}{'rank':>5}{head}{'gpipe/1f1b':>12}{'m/(p-r)':>9}")
    for name in IMPLS:
        for rank in range(p):
            cells, peaks = "", {}
            for sch in present:
                impl = rows[sch]["impls"].get(name)
                peaks[sch] = impl["peak_bytes"][rank] if impl else None
                cells += f"{'-' if peaks[sch] is None else f'{peaks[sch] / 2**20:.2f}':>16}"
            ratio = (
                f"{peaks['gpipe'] / peaks['1f1b']:.2f}" if peaks.get("gpipe") and peaks.get("1f1b") else "-"
            )
            lines.append(f"  {LABELS[name]:<20}{rank:>5}{cells}{ratio:>12}{m / (p - rank):>9.2f}")
    flights = "; ".join(f"{_label(sch, rows[sch]['v'])} {rows[sch]['in_flight']}" for sch in present)
    lines.append(f"  in flight per rank (simulate, chunk micro-batches): {flights}")
    held = [
        b for r in rows.values() for impl in r["impls"].values() for b in impl.get("held_after_bytes", [])
    ]
    lines.append(f"  still held at the end of the counting step (should be 0): {max(held, default=0):.0f} B")
    return "\n".join(lines)


def write_csv(path: str, s: dict) -> None:
    c = s["config"]
    keys = (
        "pp",
        "microbatches",
        "d_model",
        "n_layers",
        "n_heads",
        "seq_len",
        "micro_batch",
        "vocab",
        "steps",
    )
    header = [
        *keys,
        "schedule",
        "impl",
        "median_s",
        "mean_s",
        "ratio_ours_over_pytorch",
        "pipeline_s",
        "bubble_measured",
        "bubble_whole_step",
        "bubble_formula",
        "bubble_simulate",
        "first_loss",
        "peak_activation_bytes_per_rank",
        "error",
    ]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for schedule, r in s["schedules"].items():
            for name in IMPLS:
                impl = r["impls"].get(name)
                sim = r["simulate"] if name == "ours" else r["simulate_pytorch"]
                values = (
                    [
                        f"{impl['median_s']:.6f}",
                        f"{impl['mean_s']:.6f}",
                        f"{r['ratio']:.4f}" if "ratio" in r else "",
                        f"{impl['pipeline_s']:.6f}",
                        f"{impl['bubble']:.4f}",
                        f"{impl['bubble_step']:.4f}",
                        f"{r['formula']:.4f}",
                        "" if sim is None else f"{sim:.4f}",
                        f"{impl['first_loss']:.6f}",
                        ";".join(f"{b:.0f}" for b in impl["peak_bytes"]),
                        "",
                    ]
                    if impl
                    else [
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        f"{r['formula']:.4f}",
                        "",
                        "",
                        "",
                        r["errors"].get(name, ""),
                    ]
                )
                out.writerow([*(c[k] for k in keys), schedule, name, *values])


def main(argv=None) -> int:
    from dtrain.config import ConfigError

    try:
        run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

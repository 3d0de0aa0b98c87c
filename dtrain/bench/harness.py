"""The harness every benchmark runs on: its command line, the spawned Gloo world, fair timing of our
implementation against PyTorch's; the report's cells, CSV, plots and scalars are dtrain.bench.report.

A benchmark module defines `add_arguments(parser)`, optionally `check(parser, args)`, `configs(args)`
(every config it will build, so a bad one fails before any process starts), `measure(rank, args)` (run
on every rank; rank 0's result is the summary), `format_table(summary)` and `csv_rows(summary)`, and takes
`parse_args`, `run` and `main` from `commands`. Inside `measure`, `contest` builds every implementation,
runs its untimed counting steps, then alternates warm-up and timed steps of all of them, so drift and
noise hit every implementation alike, each round starting with the next implementation, so none is always
first; each step starts after a barrier (no rank's wait for a late one counts as its step) and lasts as
long as its slowest rank.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.bench import report
from dtrain.bench.comm import AFTER, FORWARD, NORM_AND_LOSS, Phase

# --- the world -----------------------------------------------------------------------------------------


def threads_per_rank(world_size: int) -> int:
    """The machine's cores shared out equally, so no rank's compute steals another's."""
    return max(1, (os.cpu_count() or 1) // world_size)


def say(rank: int, text: str) -> None:
    """A progress line, from rank 0 only (every rank runs the same steps)."""
    if rank == 0:
        print(text, flush=True)


def gather(obj: Any, world_size: int) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled: Fractions stay exact)."""
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _worker(rank, measure, args, world_size, port, timeout_s, result_path) -> None:
    torch.set_num_threads(threads_per_rank(world_size))
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(
        "gloo", init_method=url, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        out = measure(rank, args)
        if rank == 0:
            with open(result_path, "wb") as f:  # a file, not a pipe: no size limit while we join
                pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def spawn(measure: Callable, args, world_size: int, timeout_s: float = 300.0) -> tuple[Any, int]:
    """Runs `measure(rank, args)` (a module-level function: it is pickled) on `world_size` spawned Gloo
    processes; returns what rank 0's call returned and the attempts it took: a world that dies (a rank
    aborting under load) is measured once more, fresh. A collective waiting past `timeout_s` fails it."""
    from dtrain.runtime import free_port

    print(f"[bench] spawning {world_size} Gloo processes, {threads_per_rank(world_size)} threads each")
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
            path = os.path.join(tmp, "rank0.pkl")
            try:
                worker_args = (measure, args, world_size, free_port(), timeout_s, path)
                mp.start_processes(
                    _worker, args=worker_args, nprocs=world_size, join=True, start_method="spawn"
                )
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                if os.path.exists(path):
                    # Rank 0 wrote its result after the last collective of the measurement, so every rank
                    # got through it: the death came in teardown (Gloo's threads aborting at exit).
                    print(f"[bench] {e} after the measurement finished; keeping it", flush=True)
                    with open(path, "rb") as f:
                        return pickle.load(f), attempt
                if attempt == 2:
                    raise
                print(f"[bench] {e}; measuring again in a fresh world", flush=True)
                continue
            with open(path, "rb") as f:
                return pickle.load(f), attempt


# --- the implementations and their contest -------------------------------------------------------------


class Implementation:
    """One side of a comparison as `contest` drives it: `step(index)` trains step `index` (counting from
    0, the untimed steps first) and returns its loss; `lap_times(started)` adds figures of the step just
    run to its record (seconds; `started` is the step's start); `phase` tells a comm.CommRecorder which
    part of the step is running."""

    def __init__(self):
        self.phase = Phase()

    def step(self, index: int) -> float:
        raise NotImplementedError

    def lap_times(self, started: float) -> list[float]:
        return []


class TrainerSide(Implementation):
    """dtrain's Trainer on this rank; a step is Trainer.train_step, and `results` keeps its StepResults."""

    def __init__(self, cfg, grid):
        from dtrain.trainer import Trainer

        super().__init__()
        self.trainer, self.results = Trainer(cfg, grid, torch.device("cpu")), []

    def step(self, index: int) -> float:
        assert self.trainer.step == index, (self.trainer.step, index)  # the trainer counts steps itself
        self.results.append(self.train_step())
        return self.results[-1].loss

    def train_step(self):
        return self.trainer.train_step()


class TorchSide(Implementation):
    """PyTorch's side, trained by our recipe (tests/reference.py `torch_ddp_run`): the dense
    dtrain.model.Transformer's modules from the canonical initial weights, our data, the token-loss sum over
    the global batch's tokens, clipping to train.grad_clip and AdamW with our hyper-parameters at our
    learning rate. A subclass parallelises the model and sets `optimizer`; its `forward_backward(micro-
    batches)` returns this rank's share of the loss (summed over `loss_group`: the step's loss), and its
    `clip()` clips the gradients."""

    def __init__(self, cfg, data_rank: int = 0, data_ranks: int = 1, loss_group=None):
        from dtrain.data import build_dataset

        super().__init__()
        self.cfg, self.data_rank, self.data_ranks, self.loss_group = cfg, data_rank, data_ranks, loss_group
        self.global_tokens = cfg.train.global_batch_size * cfg.train.seq_len
        self.data, self.steps_done = build_dataset(cfg, "train"), 0

    def dense(self, **layout) -> torch.nn.Module:
        from dtrain.model import Transformer, init_weights

        model = Transformer(self.cfg.model, **layout)
        init_weights(model, self.cfg.train.seed)  # the same canonical weights as ours
        return model.train()

    def after_optimizer_step(self) -> None:
        """Runs between optimizer.step() and zero_grad, while gradients and updated states coexist."""

    def step(self, index: int) -> float:
        from dtrain.data import rank_microbatches
        from dtrain.trainer import lr_at

        assert self.steps_done == index, (self.steps_done, index)
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(index, t)
        self.phase.name = FORWARD
        micro = rank_microbatches(
            self.data, index, self.data_rank, self.data_ranks, t.micro_batch_size, t.global_batch_size
        )
        loss = self.forward_backward(micro).detach()
        self.phase.name = NORM_AND_LOSS
        self.clip()
        self.phase.name = AFTER
        self.optimizer.step()
        self.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.phase.name = NORM_AND_LOSS
        dist.all_reduce(loss, group=self.loss_group)
        self.steps_done += 1
        return float(loss)


@dataclass
class Contest:
    """What `contest` measured, on every rank."""

    losses: dict[str, list[float]]  # every step's loss per implementation, the untimed ones first
    counted: dict[str, list]  # what `count` returned for each untimed step
    per_rank: dict[str, list[list[list[float]]]]  # [rank][timed step] = [seconds, *lap_times]
    errors: dict[str, str]  # the implementations that did not run, and why
    impls: dict[str, Implementation]

    def step_times(self, name: str) -> list[float]:
        """Each timed step's time on its slowest rank."""
        return [max(r[0] for r in records) for records in zip(*self.per_rank[name], strict=True)]

    def summary(self, name: str) -> dict:
        """Step times (the median: the figure ratios use, robust to a stray slow step; and the mean) and
        the losses of every step, first and last."""
        times, losses = self.step_times(name), self.losses[name]
        return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "losses": losses}

    def loss_gap(self, name: str, reference: str) -> float:
        """The largest relative difference of two implementations' losses over all steps (updates too)."""
        pairs = zip(self.losses[name], self.losses[reference], strict=True)
        return max(abs(a - b) / abs(b) for a, b in pairs)

    def paired_ratios(self, name: str, reference: str) -> list[float]:
        """name's time over reference's for each timed round: the two ran one after the other, so a
        change of load that lasts longer than a round cancels out of the ratio."""
        pairs = zip(self.step_times(name), self.step_times(reference), strict=True)
        return [a / b for a, b in pairs]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of `values` (independent draws): the k-th
    smallest and the k-th largest, k the largest with P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2,
    so the interval misses the median with probability at most 1 - confidence (n = 20: the 6th and 15th,
    95.9%). Fewer than 6 values cannot reach 95%: the whole range."""
    x, n = sorted(values), len(values)
    k, cdf = 0, 1 / 2**n  # cdf = P(Binomial(n, 1/2) <= k)
    while cdf <= (1 - confidence) / 2:
        k += 1
        cdf += math.comb(n, k) / 2**n
    return (x[0], x[-1]) if k == 0 else (x[k - 1], x[n - k])


def contest(
    rank: int,
    builders: dict[str, Callable[[], Implementation]],
    labels: dict[str, str],
    warmup: int,
    steps: int,
    count: Callable[[Implementation, int], tuple[float, Any]] | None = None,
    untimed: int = 1,
    errors: dict[str, str] | None = None,
    prefix: str = "",
) -> Contest:
    """Builds each implementation and runs its `untimed` counting steps (`count(impl, index)`: the loss
    and whatever it counted; only collectives every rank reaches belong in it), one implementation after
    the other; then `warmup` + `steps` rounds of one step of each in turn, round i starting with the
    (i mod k)-th of the k implementations. An implementation that fails to build or count on any rank is
    left out with its error, never replaced by a number."""
    errors = {} if errors is None else errors
    impls, losses, counted = {}, {}, {}
    count = count or (lambda impl, index: (impl.step(index), None))

    def attempt(name: str, fn: Callable) -> tuple[bool, Any]:
        try:
            out, failed = fn(), 0.0
        except Exception as e:
            out, failed = None, 1.0
            errors[name] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        flag = torch.tensor([failed])
        dist.all_reduce(flag)  # every rank learns of a failure: one that went on alone would hang
        if float(flag):
            errors.setdefault(name, "failed on another rank")
            say(rank, f"[bench] {prefix}{labels[name]} not run: {errors[name]}")
        return not float(flag), out

    for name, build in builders.items():
        say(rank, f"[bench] {prefix}building {labels[name]}, {untimed} untimed counting step(s)")
        ok, impl = attempt(name, build)
        for index in range(untimed if ok else 0):
            ok, out = attempt(name, lambda: count(impl, index))  # noqa: B023 (called at once)
            if not ok:
                break
            losses.setdefault(name, []).append(out[0])
            counted.setdefault(name, []).append(out[1])
        if ok:
            impls[name] = impl
        else:
            losses.pop(name, None)
            counted.pop(name, None)
    if untimed:
        counted_losses = ", ".join(f"{labels[k]} {v[-1]:.6f}" for k, v in losses.items())
        say(rank, f"[bench] {prefix}counted, losses {counted_losses}")

    records: dict[str, list[list[float]]] = {name: [] for name in impls}
    names = list(impls)
    for i in range(warmup + steps):
        # Round i starts with implementation i mod k: over k rounds each runs once in every position, so
        # what one step leaves behind for the next (cache, allocator, Gloo threads) favours none of them.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            impl = impls[name]
            dist.barrier()
            started = time.perf_counter()
            losses.setdefault(name, []).append(impl.step(untimed + i))
            if i >= warmup:
                records[name].append([time.perf_counter() - started, *impl.lap_times(started)])
        if i < warmup:
            say(rank, f"[bench] {prefix}warm-up {i + 1}/{warmup}")
        else:
            now = "  ".join(f"{labels[k]} {1e3 * v[-1][0]:8.1f} ms" for k, v in records.items())
            say(rank, f"[bench] {prefix}step {i - warmup + 1}/{steps}  {now}  (rank 0)")
    per_rank = {name: gather(rows, dist.get_world_size()) for name, rows in records.items()}
    return Contest(losses, counted, per_rank, errors, impls)


def banner(title: str, world_size: int, model: str) -> list[str]:
    """A table's first lines: the technique and the world, the model's shape."""
    return ["", f"== {title} | Gloo on CPU, {threads_per_rank(world_size)} threads per rank ==", model]


# --- the command line ----------------------------------------------------------------------------------


def commands(
    module: str, description: str, world_flag: str, technique: str, steps: int, warmup: int, model: dict
):
    """`parse_args`, `run` and `main` of the benchmark module `module` (see the module docstring). Its
    flags: `world_flag` (the ranks spawned), the module's own, --steps, --warmup, the model flags (`model`:
    n_layers, seq_len and the batch flag (flag, default, help) differ between benchmarks), --timeout and
    --csv."""
    bench = sys.modules[module]
    ranks_of = world_flag.lstrip("-").replace("-", "_")

    def parse_args(argv=None) -> argparse.Namespace:
        p = argparse.ArgumentParser(prog=f"python -m {bench.__spec__.name}", description=description)
        p.add_argument(world_flag, type=int, default=2, help=f"{technique} ranks (processes spawned)")
        bench.add_arguments(p)
        p.add_argument("--steps", type=int, default=steps, help="timed steps per implementation")
        p.add_argument("--warmup", type=int, default=warmup, help="untimed steps before them, after counting")
        p.add_argument("--d-model", type=int, default=256)
        p.add_argument("--n-layers", type=int, default=model["n_layers"])
        p.add_argument("--n-heads", type=int, default=8)
        p.add_argument(
            "--n-kv-heads",
            type=int,
            default=model.get("n_kv_heads"),
            help="key/value heads (none: --n-heads)",
        )
        p.add_argument("--seq-len", type=int, default=model["seq_len"])
        flag, default, help_ = model["batch"]
        p.add_argument(flag, type=int, default=default, help=help_)
        p.add_argument("--vocab", type=int, default=model.get("vocab", 1024))
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--timeout", type=float, default=300.0, help="Gloo timeout (s): a hung step fails")
        p.add_argument("--csv", default=None, help="also write the summary rows to this file")
        args = p.parse_args(argv)
        if getattr(args, ranks_of) < 2:
            p.error(f"{world_flag} {getattr(args, ranks_of)}: {technique} needs at least 2 ranks")
        if args.steps < 1 or args.warmup < 0:
            p.error("--steps must be at least 1 and --warmup at least 0")
        getattr(bench, "check", lambda p, args: None)(p, args)
        return args

    def run(argv=None) -> dict:
        """Spawns the ranks, measures, prints the table (rank 0's results) and returns the summary."""
        args = parse_args(argv)
        bench.configs(args)
        raw, _attempts = spawn(bench.measure, args, getattr(args, ranks_of), args.timeout)
        summary = raw | {"config": vars(args)}
        print(bench.format_table(summary), flush=True)
        if args.csv:
            report.write_csv(args.csv, bench.csv_rows(summary))
        return summary

    return parse_args, run, lambda argv=None: exit_status(run, argv)


def exit_status(run: Callable, argv=None) -> int:
    """Runs the command; a config dtrain rejects is an error message and exit status 2, not a traceback."""
    from dtrain.config import ConfigError

    try:
        run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def config_of(args, overrides: list[str], world_size: int):
    """The validated dtrain config of the model flags plus a benchmark's `overrides`. Dropout is off so
    every implementation computes the same loss."""
    from dtrain.config import load_config
    from dtrain.validation import validate

    model = [
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.n_kv_heads={'null' if args.n_kv_heads is None else args.n_kv_heads}",
        f"model.max_seq_len={args.seq_len}",
        "model.dropout=0.0",
        f"train.seq_len={args.seq_len}",
        f"train.seed={args.seed}",
    ]
    return validate(load_config(None, [*model, *overrides]), world_size)

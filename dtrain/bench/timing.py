"""Timing steps fairly: every step starts after a barrier, the implementations alternate step by step, and a
step lasts as long as its slowest rank."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dtrain.bench.world import say

# steps[name](index) runs step `index` of one implementation: (its loss, this rank's record of it), the
# record's first entry being the step time in seconds.
Step = Callable[[int], tuple[float, list[float]]]


def after_barrier(fn: Callable, *args) -> tuple[Any, float, float]:
    """fn(*args) started right after a barrier, so all ranks start together and no rank's wait for a late
    one counts as its step: its result, start and end (time.perf_counter)."""
    dist.barrier()
    started = time.perf_counter()
    out = fn(*args)
    return out, started, time.perf_counter()


def alternate(
    rank: int,
    steps: dict[str, Step],
    losses: dict[str, list[float]],
    warmup: int,
    timed: int,
    labels: dict[str, str],
    first_index: int = 0,
    prefix: str = "",
) -> dict[str, list[list[float]]]:
    """`warmup` + `timed` rounds, each one step of every implementation in turn: alternating, so drift and
    noise hit both alike. Step indices count from `first_index`; every loss is appended to losses[name],
    and the records of the timed rounds are returned per implementation. Progress lines (rank 0's step
    times) start with `prefix`."""
    records: dict[str, list[list[float]]] = {name: [] for name in steps}
    for i in range(warmup + timed):
        for name, step in steps.items():
            loss, record = step(first_index + i)
            losses[name].append(loss)
            if i >= warmup:
                records[name].append(record)
        if i < warmup:
            say(rank, f"[bench] {prefix}warm-up {i + 1}/{warmup}")
        else:
            now = "  ".join(f"{labels[k]} {1e3 * v[-1][0]:8.1f} ms" for k, v in records.items())
            say(rank, f"[bench] {prefix}step {i - warmup + 1}/{timed}  {now}  (rank 0)")
    return records


def slowest(times: list[float]) -> list[float]:
    """Each step's time on the slowest rank (a collective: every rank calls it with its own times)."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def median_mean(times: list[float]) -> dict[str, float]:
    """The median (the figure the ratios use: robust to a stray slow step) and the mean of step times."""
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times)}

"""The process world a benchmark runs in: one spawned CPU process per rank, joined in one Gloo group.

Every benchmark measures ours and PyTorch's implementation inside the same world, so both see the same
processes, threads and network; `spawn` runs the benchmark's `measure(rank, args)` on every rank and
hands back rank 0's result.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.runtime import free_port


def threads_per_rank(world_size: int) -> int:
    """The machine's cores shared out equally, so no rank's compute steals another's."""
    return max(1, (os.cpu_count() or 1) // world_size)


def say(rank: int, text: str) -> None:
    """A progress line, from rank 0 only (every rank runs the same steps)."""
    if rank == 0:
        print(text, flush=True)


def gather(values: list[float], size: int) -> list[list[float]]:
    """Every rank's list of floats (equal lengths), gathered on every rank."""
    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _worker(
    rank: int, measure: Callable, args, world_size: int, port: int, timeout_s: float, result_path: str
) -> None:
    torch.set_num_threads(threads_per_rank(world_size))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        out = measure(rank, args)
        if rank == 0:
            with open(result_path, "wb") as f:  # a file, not a pipe: no size limit while we join
                pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def spawn(measure: Callable[[int, Any], Any], args, world_size: int, timeout_s: float = 300.0) -> Any:
    """Runs `measure(rank, args)` on `world_size` spawned Gloo processes (a collective that waits longer
    than `timeout_s` fails the run) and returns what rank 0's call returned. `measure` must be picklable:
    a module-level function."""
    threads = threads_per_rank(world_size)
    print(f"[bench] spawning {world_size} Gloo processes, {threads} threads each", flush=True)
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        result_path = os.path.join(tmp, "rank0.pkl")
        mp.start_processes(
            _worker,
            args=(measure, args, world_size, free_port(), timeout_s, result_path),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        with open(result_path, "rb") as f:
            return pickle.load(f)

"""Random streams for dropout under tensor parallelism.

In a replicated region (the residual stream without sequence parallelism) every tensor rank holds the
same activations and must drop the same elements, so they share the default generator, seeded per step
from (seed, step) and the non-tensor coordinates only. In a tensor-split region (attention heads, or the
residual stream's sequence chunks under sequence parallelism) each rank holds different elements and
must draw a different mask, else the dropped positions would repeat across heads or chunks.

`split_region(tp_rank)` runs its body on a stream derived from one draw of the default generator and the
tensor rank, then restores the default stream. Because the draw comes from the default generator, whose
state torch.utils.checkpoint saves and restores, activation checkpointing replays the same masks on
recomputation without any tracker state of its own.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def _mix(seed: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}".encode()).digest()[:8], "little") % 2**63


def manual_seed(seed: int) -> None:
    """torch.manual_seed for the generators a step draws from: the CPU's and, once CUDA is initialized,
    the GPUs'. torch.manual_seed also queues a seed for each accelerator not yet initialized (CUDA on a
    CPU run, MTIA, XPU), formatting a stack trace for each: 0.2 ms a call, in every split region."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def split_region(tp_rank: int):
    seed = int(torch.randint(0, 2**62, (1,)).item())  # same draw on every tensor rank
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        manual_seed(_mix(seed, tp_rank))
        yield

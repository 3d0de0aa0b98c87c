"""What the pipeline benchmark measures with, on both pipelines alike: each rank's busy time per step
(forward hooks on the chunks, a patched torch.autograd.backward) and the bytes autograd holds for backward
(saved-tensor hooks)."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Clock:
    """This rank's busy time in the current step (seconds), and when its schedule returned."""

    forward: float = 0.0
    backward: float = 0.0
    pipeline_end: float = 0.0
    started: list[float] = field(default_factory=list)  # open forward calls (chunks nest in nothing)
    depth: int = 0  # open backward calls: nested ones count once


def time_forwards(module: torch.nn.Module, clock: Clock) -> None:
    """Adds the wall time of every call of `module` to clock.forward (the hooks stay with the module)."""

    def pre(*_):
        clock.started.append(time.perf_counter())

    def post(*_):
        clock.forward += time.perf_counter() - clock.started.pop()

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


@contextlib.contextmanager
def timing_backwards(clock: Clock):
    """Patches torch.autograd.backward and torch.autograd.grad, in this process while active, to add their
    wall time to clock.backward (nested calls count once). Our executor calls torch.autograd.backward, and
    torch.autograd.grad then backward in a split last backward (parallel.split_backward); PyTorch's
    stage_backward calls them too, all resolving the module attribute at call time."""
    saved = {name: getattr(torch.autograd, name) for name in ("backward", "grad")}

    def timed(fn):
        def call(*args, **kwargs):
            clock.depth, started = clock.depth + 1, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.depth -= 1
                clock.backward += time.perf_counter() - started if clock.depth == 0 else 0.0

        return functools.wraps(fn)(call)

    for name, fn in saved.items():
        setattr(torch.autograd, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.autograd, name, fn)


class _Saved:
    """What a pack hook hands autograd: the tensor, plus a release that runs when autograd drops it. The
    tensor is kept detached: an op's saved output held with its grad_fn would be a reference cycle through
    the graph (node -> saved -> tensor -> node) that only a backward which frees the graph breaks, so a
    graph kept alive between two backward passes would never be collected."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: torch.Tensor, meter: ActivationMeter | None, key):
        self.tensor, self.meter, self.key = tensor.detach(), meter, key

    def __del__(self):
        if self.meter is not None:
            self.meter.release(self.key)


class ActivationMeter:
    """Bytes of tensor storage autograd holds for backward while active: running total and peak. A
    storage saved by several ops (or through several views) counts once, while any of its saves is alive;
    the storages of the modules' parameters and buffers are not activations and are skipped."""

    def __init__(self, modules):
        self.exclude = {
            t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]
        }
        self.live: dict[int, list[int]] = {}  # storage pointer -> [saves alive, bytes]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)

    def _pack(self, t: torch.Tensor) -> _Saved:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a tensor subclass)
            return _Saved(t, None, None)
        if key == 0 or key in self.exclude:
            return _Saved(t, None, None)
        entry = self.live.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(t, self, key)

    def release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self.live[key]
                self.current -= entry[1]

    def __enter__(self) -> ActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class Clocked:
    """A pipeline whose steps start a fresh Clock and record [pipeline phase, forward, backward]; with no
    clock (None) it runs untimed, with no hooks."""

    clock: Clock | None

    def step(self, index: int) -> float:
        if self.clock is not None:
            self.clock.forward = self.clock.backward = self.clock.pipeline_end = 0.0
            self.clock.started.clear()
        return super().step(index)

    def lap_times(self, started: float) -> list[float]:
        if self.clock is None:
            return []
        return [self.clock.pipeline_end - started, self.clock.forward, self.clock.backward]

"""Activation memory for the pipeline benchmark (dtrain.bench.pipeline): the bytes autograd holds for
backward, counted through torch.autograd.graph.saved_tensors_hooks, as a running total and its peak."""

from __future__ import annotations

import torch


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
    """The storages of the modules' parameters and buffers: what an ActivationMeter must not count."""
    out = set()
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            out.add(t.untyped_storage().data_ptr())
    return out

"""Counting the collectives a training step issues, and what they cost in bytes sent per rank.

Two recorders see the two ways a step can reach the network. `CollectiveRecorder` patches the
torch.distributed collectives our library calls (dist.all_reduce(...) and friends); `CollectiveCounter` is
a dispatcher mode that sees DTensor's functional collectives, the way
torch.distributed.tensor.debug.CommDebugMode counts them. Each call becomes a `Call` (op, full tensor
bytes, group size, phase of the step), and `ring_bytes` turns it into bytes sent per rank with the ring
costs of FORMULAS.md (`ring_bytes` and the op names live in parallel.ledger, the library's communication
ledger, and are re-exported here).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.distributed as dist

# Re-exported for the benchmarks, which import them from here.
from parallel.ledger import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, REDUCE_SCATTER, ring_bytes

# The parts of a training step a call is stamped with, in step order (the tables sort by it).
FORWARD, BACKWARD, AFTER = "forward", "backward", "grad sync + optimizer"
PHASES = (FORWARD, BACKWARD, AFTER)


@dataclass
class Call:
    """One collective call: its op, the full (gathered) tensor size S, the group size and the phase."""

    kind: str
    full_bytes: int
    group_size: int
    phase: str

    @property
    def sent(self) -> Fraction:
        return ring_bytes(self.kind, self.full_bytes, self.group_size)


class Phase:
    """Which part of the step is running; steps set it, recorders stamp it on every call."""

    name = FORWARD


UNWATCHED = Phase()  # the phase a step sets when no recorder is listening (its timed steps)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# torch.distributed.<name> -> (kind, the full size S in bytes from the bound arguments)
_WRAPPED = {
    "all_reduce": (ALL_REDUCE, lambda a: _nbytes(a["tensor"])),
    "all_gather_single": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "reduce_scatter_single": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
    "all_gather": (ALL_GATHER, lambda a: sum(_nbytes(t) for t in a["tensor_list"])),
    "all_gather_into_tensor": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "reduce_scatter_tensor": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
}


@dataclass
class CollectiveRecorder:
    """Records every call of the torch.distributed collectives in `_WRAPPED` while active. The library
    calls them through the module attribute (`dist.all_reduce(...)`), so patching the attribute, in this
    process only, sees them all; the originals are restored on exit."""

    phase: Phase
    calls: list[Call] = field(default_factory=list)

    def __enter__(self) -> CollectiveRecorder:
        self._saved = {name: getattr(dist, name) for name in _WRAPPED}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, fn):
        kind, size_of = _WRAPPED[name]
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            n = dist.get_world_size(bound.arguments.get("group"))
            self.calls.append(Call(kind, size_of(bound.arguments), n, self.phase.name))
            return fn(*args, **kwargs)

        return wrapper


_FUNCOL_KINDS = {
    "all_reduce": ALL_REDUCE,
    "all_reduce_": ALL_REDUCE,
    "all_reduce_coalesced": ALL_REDUCE,
    "all_reduce_coalesced_": ALL_REDUCE,
    "all_gather_into_tensor": ALL_GATHER,
    "all_gather_into_tensor_coalesced": ALL_GATHER,
    "reduce_scatter_tensor": REDUCE_SCATTER,
    "reduce_scatter_tensor_coalesced": REDUCE_SCATTER,
    "all_to_all_single": ALL_TO_ALL,
}

# What torch.distributed.<collective> dispatches to (the set CommDebugMode counts).
_C10D_COLLECTIVES = {
    "_allgather_base_",
    "_reduce_scatter_base_",
    "allgather_",
    "allgather_coalesced_",
    "allgather_into_tensor_coalesced_",
    "allreduce_",
    "allreduce_coalesced_",
    "alltoall_",
    "alltoall_base_",
    "broadcast_",
    "gather_",
    "scatter_",
    "reduce_",
    "reduce_scatter_",
    "reduce_scatter_tensor_coalesced_",
}


def _funcol_call(func, args, kwargs, phase: str) -> Call | None:
    """A functional collective (what DTensor issues) as a Call, or None for any other op."""
    if getattr(func, "namespace", None) != "_c10d_functional":
        return None
    kind = _FUNCOL_KINDS.get(func._overloadpacket.__name__)
    if kind is None:
        return None
    bound = {a.name: v for a, v in zip(func._schema.arguments, args, strict=False)} | dict(kwargs or {})
    tensors = bound["inputs"] if "inputs" in bound else [bound["input"]]
    nbytes = sum(_nbytes(t) for t in tensors)
    if "group_size" in bound:
        n = int(bound["group_size"])
    else:
        from torch.distributed.distributed_c10d import _resolve_process_group

        n = _resolve_process_group(bound["group_name"]).size()
    if kind == ALL_GATHER:
        nbytes *= n  # the input is one shard; S is the gathered size
    return Call(kind, nbytes, n, phase)


class CollectiveCounter:
    """Counts the collectives that reach the dispatcher, per op, and records the bytes of DTensor's
    functional collectives, the way torch.distributed.tensor.debug.CommDebugMode does: DTensor ops are
    let through first, so they desugar into the collectives counted here. CommDebugMode itself breaks on
    this model: its module tracker registers a forward hook per call, and each Block calls its dropout
    module twice in one forward."""

    def __init__(self, phase: Phase):
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts: dict[str, int] = {}
        self.calls: list[Call] = []
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(t is DTensor for t in types):
                    return NotImplemented
                out = func(*args, **(kwargs or {}))
                namespace = getattr(func, "namespace", None)
                name = func._overloadpacket.__name__ if namespace else ""
                call = _funcol_call(func, args, kwargs, phase.name)
                if call is not None or (namespace == "c10d" and name in _C10D_COLLECTIVES):
                    key = f"{namespace}.{name}"
                    counter.counts[key] = counter.counts.get(key, 0) + 1
                if call is not None:
                    counter.calls.append(call)
                return out

        self._mode = _Mode()

    def __enter__(self) -> CollectiveCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

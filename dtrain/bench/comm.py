"""Counting the collectives a training step issues, and what they cost in bytes sent per rank.

`CommRecorder` is a dispatcher mode, so it sees every collective however it is issued: torch.distributed's
functions (our library) and DDP's C++ reducer both reach the dispatcher as c10d operators, out of reach of
any patch of Python functions, and DTensor's functional collectives as _c10d_functional operators (the set
torch.distributed.tensor.debug.CommDebugMode counts). Each becomes a `Call` (op, full tensor bytes, group
size, phase of the step, bytes sent) priced with the ring costs of docs/formulas.md (`ring_bytes` and the op
names live in parallel.ledger, the library's communication ledger, and are re-exported here); an
all-to-all sends exactly the input rows whose split belongs to another rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# Re-exported for the benchmarks, which import them from here.
from parallel.ledger import (
    ALL_GATHER,
    ALL_REDUCE,
    ALL_TO_ALL,
    REDUCE_SCATTER,
    RING_PRICED,
    exchange_share,
    ring_bytes,
    tensor_bytes,
)

# The parts of a training step a call is stamped with, in step order (the tables sort by it); PyTorch's
# gradient clipping and loss all-reduce are stamped NORM_AND_LOSS: they are not model-state traffic.
FORWARD, BACKWARD, AFTER, NORM_AND_LOSS = "forward", "backward", "grad sync + optimizer", "norm + loss"
PHASES = (FORWARD, BACKWARD, AFTER, NORM_AND_LOSS)


class Phase:
    """Which part of its step an implementation is running; its steps set it, a recorder reads it."""

    name = FORWARD


@dataclass
class Call:
    kind: str
    full_bytes: int  # S: the full (gathered) size
    group_size: int
    phase: str
    sent: Fraction  # bytes this rank sends


# c10d.<op> -> (kind, the argument holding the full size S): the ledger's ring-priced operators, and an
# all-to-all's input (the rows bound for other ranks are priced in _call)
_C10D = {**RING_PRICED, "alltoall_base_": (ALL_TO_ALL, "input")}
# _c10d_functional.<op> (with or without _coalesced and a trailing _) -> kind; their inputs are what this
# rank holds: an all-gather's is one shard of S
_FUNCTIONAL = {
    "all_reduce": ALL_REDUCE,
    "all_gather_into_tensor": ALL_GATHER,
    "reduce_scatter_tensor": REDUCE_SCATTER,
    "all_to_all_single": ALL_TO_ALL,
}


def _call(namespace: str, name: str, bound: dict, phase: str) -> Call | None:
    """The collective operator `namespace.name` with bound arguments as a Call, or None for another op."""
    functional = _FUNCTIONAL.get(name.removesuffix("_").removesuffix("_coalesced"))
    share = exchange_share(name, bound) if namespace == "c10d" else None
    if share is not None:  # parallel.exchange: the opening send stands for the collective
        kind, full = share
        if full is None:
            return None
        n = dist.ProcessGroup.unbox(bound["process_group"]).size()
    elif namespace == "c10d" and name in _C10D:
        kind, sized = _C10D[name]
        group = dist.ProcessGroup.unbox(bound["process_group"])  # a TorchScript object at the dispatcher
        n, full = group.size(), tensor_bytes(bound[sized])
        if kind == ALL_TO_ALL:  # uneven splits: the rows bound for other ranks, not the ring figure
            x = bound["input"]
            splits = list(bound["input_split_sizes"]) or [x.shape[0] // n] * n
            leaving = (x.shape[0] - splits[group.rank()]) * (full // max(1, x.shape[0]))
            return Call(kind, full, n, phase, Fraction(leaving))
    elif namespace == "_c10d_functional" and functional:
        from torch.distributed.distributed_c10d import _resolve_process_group

        kind, full = functional, tensor_bytes(bound["inputs"] if "inputs" in bound else bound["input"])
        n = int(bound.get("group_size") or _resolve_process_group(bound["group_name"]).size())
        full *= n if kind == ALL_GATHER else 1
    else:
        return None
    return Call(kind, full, n, phase, ring_bytes(kind, full, n))


class CommRecorder(TorchDispatchMode):
    """Records every collective reaching the dispatcher while active (`with CommRecorder(phase):`),
    stamped with `phase.name`: `calls`, and `counts` per operator. DTensor ops are let through first, so
    they desugar into the collectives recorded here. (CommDebugMode itself breaks on this model: its
    module tracker registers a forward hook per call, and each Block calls its dropout twice a forward.)"""

    def __init__(self, phase: Phase):
        from torch.distributed.tensor import DTensor  # here: importing it costs every `dtrain` command 1 s

        super().__init__()
        self.phase, self.calls, self.counts, self._dtensor = phase, [], {}, DTensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is self._dtensor for t in types):
            return NotImplemented
        kwargs, namespace = kwargs or {}, getattr(func, "namespace", None)
        if namespace in ("c10d", "_c10d_functional"):
            name = func._overloadpacket.__name__
            bound = {a.name: v for a, v in zip(func._schema.arguments, args, strict=False)} | kwargs
            call = _call(namespace, name, bound, self.phase.name)
            if call is not None:
                self.calls.append(call)
                self.counts[f"{namespace}.{name}"] = self.counts.get(f"{namespace}.{name}", 0) + 1
        return func(*args, **kwargs)

    def total(self) -> Fraction:
        return sum((c.sent for c in self.calls), Fraction(0))


def tally_lines(
    calls_of: dict[str, list[Call]], label_width: int, phase_width: int, counts=None
) -> list[str]:
    """The table of collectives per step, a block per implementation label: calls and MiB sent per phase
    and op, in step order; with `counts` (label -> operator counts) the dispatcher's operators below."""
    lines = [f"  {'':<{label_width}}{'phase':<{phase_width}}{'op':<16}{'calls':>6}{'sent':>14}"]
    for label, calls in calls_of.items():
        rows: dict[tuple[str, str], list] = {}
        for c in sorted(calls, key=lambda c: (PHASES.index(c.phase), c.kind)):
            row = rows.setdefault((c.phase, c.kind), [0, Fraction(0)])
            row[0], row[1] = row[0] + 1, row[1] + c.sent
        for i, ((phase, kind), (count, sent)) in enumerate(rows.items()):
            shown = label if i == 0 else ""
            sent_mib = f"{float(sent) / 2**20:.3f} MiB"
            lines.append(f"  {shown:<{label_width}}{phase:<{phase_width}}{kind:<16}{count:>6}{sent_mib:>14}")
        if counts is not None:
            lines.append(
                f"  {'':<{label_width}}dispatcher ops: "
                + ", ".join(f"{op} {n}" for op, n in sorted(counts[label].items()))
            )
    return lines

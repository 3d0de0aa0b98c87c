"""The communication ledger: every collective and point-to-point op this process issues while the ledger
is entered, counted per (grid axis, op) as calls and bytes sent by this rank.

How it sees them: each torch.distributed call dispatches one c10d operator (dist.all_reduce ->
c10d.allreduce_, all_gather_flat -> c10d._allgather_base_, reduce_scatter_flat -> c10d._reduce_scatter_base_,
all_to_all_single -> c10d.alltoall_base_, batch_isend_irecv -> c10d.send / c10d.recv_, ...); over Gloo the
flat all-gather and reduce-scatter are parallel.exchange's tagged sends, counted as the collective. A
TorchDispatchMode sees every such operator, whether it is issued in forward, inside autograd's backward (the
conjugate collectives of parallel.collectives, the all-to-all adjoints) or from a post-accumulate-grad hook
(data-parallel buckets), synchronously or with async_op=True. The operator's process-group argument gives the
torch group name, which the grid maps to its axis (tp, dp, pp, ep, edp, embed; under hybrid sharding dp_shard,
dp_replicate and edp_shard, so the replicas' all-reduce, the traffic that crosses nodes, reads apart; the
default group is "world"). Nothing is patched and nothing is global: the mode is active only inside `with
ledger:`, in the entering thread (and in autograd's, which inherits it).

The mode adds Python work to every operator, not only collectives, so a trainer enters it only on the
steps it logs.

Bytes sent per rank, for a tensor of S bytes (S the full, gathered size) over n ranks, docs/formulas.md:

  all-reduce       2(n-1)/n * S   (ring: reduce-scatter then all-gather)
  all-gather       (n-1)/n * S
  reduce-scatter   (n-1)/n * S
  all-to-all       the rows of the input that leave the rank (uneven splits: not the ring figure)
  send             the tensor's bytes; recv sends nothing (its bytes are counted by the sender)
  broadcast/reduce (n-1)/n * S (pipelined ring, the per-rank average); gather/scatter: the pieces this
                   rank hands to others; barrier: nothing

A collective over one rank sends nothing and is not recorded (the library skips most of them anyway).
Collectives run inside `ledger.bookkeeping()` are tallied apart: the trainer uses it for the reductions
that only feed its metrics (the loss sum, MoE routing statistics), so the training figures are what the
layout itself costs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
)
SEND, RECV, BROADCAST, REDUCE, GATHER, SCATTER = "send", "recv", "broadcast", "reduce", "gather", "scatter"
BARRIER = "barrier"
TRAINING, BOOKKEEPING = "training", "bookkeeping"


def ring_bytes(kind: str, full_bytes: int, n: int) -> Fraction:
    """Bytes one rank sends for a collective over n ranks on a tensor of `full_bytes` (the full, gathered
    size): all-reduce 2(n-1)/n * S; all-gather, reduce-scatter and all-to-all (n-1)/n * S."""
    if n <= 1:
        return Fraction(0)
    if kind == ALL_REDUCE:
        return Fraction(2 * (n - 1), n) * full_bytes
    if kind in (ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL, BROADCAST, REDUCE):
        return Fraction(n - 1, n) * full_bytes
    raise ValueError(f"no ring cost for {kind!r}")


@dataclass
class Tally:
    calls: int = 0
    sent: Fraction = Fraction(0)  # bytes this rank sent

    def add(self, calls: int, sent: Fraction | int) -> None:
        self.calls += calls
        self.sent += Fraction(sent)


def tensor_bytes(t) -> int:
    """Bytes of a tensor or of (nested) lists of them, as c10d operators receive them."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(tensor_bytes(x) for x in t)  # (nested) lists of tensors


# c10d operators priced at their ring cost: operator -> (op, the argument holding S, the full tensors).
# dtrain.bench.comm prices with the same table.
RING_PRICED = {
    "allreduce_": (ALL_REDUCE, "tensors"),
    "allreduce_coalesced_": (ALL_REDUCE, "tensors"),
    "_allgather_base_": (ALL_GATHER, "output_tensor"),
    "allgather_": (ALL_GATHER, "output_tensors"),
    "allgather_coalesced_": (ALL_GATHER, "output_lists"),
    "allgather_into_tensor_coalesced_": (ALL_GATHER, "outputs"),
    "_reduce_scatter_base_": (REDUCE_SCATTER, "input_tensor"),
    "reduce_scatter_": (REDUCE_SCATTER, "input_tensors"),
    "reduce_scatter_tensor_coalesced_": (REDUCE_SCATTER, "inputs"),
    "broadcast_": (BROADCAST, "tensors"),
    "reduce_": (REDUCE, "tensors"),
}


def _price(name: str, a: dict, rank: int, n: int) -> tuple[str, Fraction] | None:
    """(op, bytes this rank sends) for c10d operator `name` with bound arguments `a`, issued by group
    rank `rank` of `n`; None for an operator without a price."""
    if name in RING_PRICED:
        op, arg = RING_PRICED[name]
        return op, ring_bytes(op, tensor_bytes(a[arg]), n)
    if name == "alltoall_base_":  # all_to_all_single: the input rows whose split is another rank's
        x, splits = a["input"], list(a["input_split_sizes"])
        rows = x.shape[0] if x.dim() else 0
        splits = splits or [rows // n] * n  # equal splits when none are given
        row_bytes = x.numel() // rows * x.element_size() if rows else 0
        return ALL_TO_ALL, Fraction((rows - splits[rank]) * row_bytes)
    if name == "alltoall_":
        return ALL_TO_ALL, Fraction(
            sum(tensor_bytes(t) for j, t in enumerate(a["input_tensors"]) if j != rank)
        )
    if name == "send":
        return SEND, Fraction(tensor_bytes(a["tensors"]))
    if name in ("recv_", "recv_any_source_"):
        return RECV, Fraction(0)
    if name == "gather_":  # every rank but the root hands its tensor over
        return GATHER, Fraction(0 if rank == a["root_rank"] else tensor_bytes(a["input_tensors"]))
    if name == "scatter_":  # the root hands every other rank its piece
        pieces = a["input_tensors"][0] if rank == a["root_rank"] else []
        return SCATTER, Fraction(sum(tensor_bytes(t) for j, t in enumerate(pieces) if j != rank))
    if name in ("barrier", "monitored_barrier_"):
        return BARRIER, Fraction(0)
    return None


# parallel.exchange's point-to-point all-gathers and reduce-scatters (over Gloo) are counted as the
# collective they stand for: each send carries its tag, the opening send (to the group's next rank) one
# more. Tags fit Gloo's 32 bits and stay clear of the small ones pipelines use.
EXCHANGE_TAGS = {ALL_GATHER: 0x4147_0000, REDUCE_SCATTER: 0x5253_0000}


def exchange_tag(op: str, opens: bool) -> int:
    return EXCHANGE_TAGS[op] + opens


_EXCHANGE_OF_TAG = {exchange_tag(op, o): (op, o) for op in EXCHANGE_TAGS for o in (False, True)}


def exchange_share(name: str, a: dict) -> tuple[str, int | None] | None:
    """For c10d operator `name` (bound arguments `a`) that belongs to an exchange: (its collective, the
    full size S = n * the part sent on the opening send, None on the other sends and the receives, which
    the opening one counts); None for any other operator."""
    if name not in ("send", "recv_") or a.get("tag") not in _EXCHANGE_OF_TAG:
        return None
    op, opens = _EXCHANGE_OF_TAG[a["tag"]]
    if name == "recv_" or not opens:
        return op, None
    return op, tensor_bytes(a["tensors"]) * _process_group(a["process_group"]).size()


def _process_group(obj):
    """The ProcessGroup behind the ScriptObject a c10d operator receives."""
    return torch._C._distributed_c10d.ProcessGroup.unbox(obj)


class _Mode(TorchDispatchMode):
    def __init__(self, ledger: CommLedger):
        super().__init__()
        self.ledger = ledger

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # torch.compile'd code (compiled transformer blocks) runs with the mode off while it is traced and
        # its fused kernels bypass it; what it may compile holds no collectives, which stay eager.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "namespace", None) == "c10d":
            self.ledger._seen(func, args, kwargs or {})
        return out


class CommLedger:
    """Counts what this rank communicates while entered (`with CommLedger(grid) as ledger: ...`).

    grid: a parallel.grid.ProcessGrid whose `axis_of` names the groups; without one, the default group
    is "world" and any other "group<torch name>". Figures: `tallies()` ({(axis, op): Tally}),
    `total_bytes()` and `metrics()` (flat keys for a metrics record).
    """

    def __init__(self, grid=None):
        self.grid = grid
        self._tallies: dict[str, dict[tuple[str, str], Tally]] = {TRAINING: {}, BOOKKEEPING: {}}
        self._section = TRAINING
        self._axes: dict[str, str] = {}  # torch group name -> axis
        self.unpriced: set[str] = set()  # c10d operators counted as calls without a byte figure
        self._mode = _Mode(self)

    def __enter__(self) -> CommLedger:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    @contextlib.contextmanager
    def bookkeeping(self):
        """Collectives issued inside are tallied as bookkeeping, apart from the training figures."""
        previous, self._section = self._section, BOOKKEEPING
        try:
            yield
        finally:
            self._section = previous

    def _axis(self, pg) -> str:
        name = pg.group_name
        if name not in self._axes:
            axis = self.grid.axis_of(name) if self.grid is not None else None
            if axis is None:
                axis = "world" if name == dist.group.WORLD.group_name else f"group{name}"
            if axis in ("dp_cp", "edp_cp") and self.grid is not None and self.grid.size("cp") == 1:
                axis = axis[:-3]  # the same ranks as dp (edp): report the name users know
            self._axes[name] = axis
        return self._axes[name]

    def _seen(self, func, args, kwargs) -> None:
        schema = func._schema.arguments
        bound = {a.name: v for a, v in zip(schema, args, strict=False)} | kwargs
        if "process_group" not in bound:
            return  # not a communication (c10d::check_for_nan)
        pg = _process_group(bound["process_group"])
        n = pg.size()
        if n <= 1:
            return
        name = func._overloadpacket.__name__
        share = exchange_share(name, bound)
        if share is not None:
            op, full = share
            if full is None:
                return
            priced = op, ring_bytes(op, full, n)
        else:
            priced = _price(name, bound, pg.rank(), n)
        if priced is None:
            self.unpriced.add(name)
        op, sent = priced or (name, Fraction(0))
        self._tallies[self._section].setdefault((self._axis(pg), op), Tally()).add(1, sent)

    def tallies(self, section: str = TRAINING) -> dict[tuple[str, str], Tally]:
        return dict(sorted(self._tallies[section].items()))

    def total_bytes(self, section: str = TRAINING) -> Fraction:
        return sum((t.sent for t in self._tallies[section].values()), Fraction(0))

    def metrics(self, prefix: str = "comm") -> dict[str, int | float]:
        return metrics_of(self.tallies(), self.tallies(BOOKKEEPING), prefix)


def metrics_of(training: dict, bookkeeping: dict, prefix: str = "comm") -> dict[str, int | float]:
    """Flat metric keys from {(axis, op): Tally}: `<prefix>/<axis>/<op>_bytes` and `_calls` for the
    training traffic, `<prefix>/total_bytes`, and `<prefix>/bookkeeping_bytes` and `_calls` for what
    was set apart. Ops are spelled with underscores (all_reduce); bytes are ints unless a ring share is
    fractional."""

    def number(x: Fraction) -> int | float:
        return int(x) if x.denominator == 1 else float(x)

    out: dict[str, int | float] = {}
    for (axis, op), t in sorted(training.items()):
        key = f"{prefix}/{axis}/{op.replace('-', '_')}"
        out[f"{key}_bytes"], out[f"{key}_calls"] = number(t.sent), t.calls
    out[f"{prefix}/total_bytes"] = number(sum((t.sent for t in training.values()), Fraction(0)))
    out[f"{prefix}/bookkeeping_bytes"] = number(sum((t.sent for t in bookkeeping.values()), Fraction(0)))
    out[f"{prefix}/bookkeeping_calls"] = sum(t.calls for t in bookkeeping.values())
    return out

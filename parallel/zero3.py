"""ZeRO stage 3: parameters sharded too (16/N bytes per parameter for fp32 AdamW, docs/formulas.md).

A unit (the embedding, each transformer block, the final norm with the head) is one flat bucket whose
whole tensor exists only while the unit runs. Rank r keeps the slice [r*S, (r+1)*S) in `store`.

  forward:  pre-hook all-gathers the unit (and starts the next unit's gather: prefetch), post-hook frees
            it by resizing its storage to zero. Autograd's saved tensors are views of that storage.
  backward: a hook on the unit's output fires when its gradient arrives, before the unit's backward
            runs: it all-gathers the unit into the same storage again (saved tensors see the values) and
            prefetches the unit before it. When every parameter of the unit has its gradient, the
            gradient bucket is reduce-scattered into the persistent shard (as stage 2) and the whole
            parameters are freed.
  step:     AdamW on the shards; nothing is gathered until the next use.

Frozen parameters (requires_grad False: a LoRA base) are sharded and gathered alike, as a second part of
their unit (`FrozenShard`), but have no gradient, reduction or optimizer state. Their last use in a
unit's backward is the gradient of the unit's input, so they are freed when that gradient reaches the unit
before (its output hook fires), or at the end of backward.

Every rank runs the same modules in the same order, so gathers match across ranks. A parameter used
outside its unit (an output head tied to the embedding) belongs to the embedding's unit, which the head's
hooks gather and free as well. Activation checkpointing recomputes a block inside its backward: the unit
is then already gathered and is not freed by the recomputation's post-hook.

Stage 3 is the stage 1/2 machinery (parallel.zero.ZeroDataParallel: flat buckets, reduce-scatter into
gradient shards, sharded AdamW) composed with `ShardedParams`, the residency that keeps only the shard of
each unit between uses; `zero3` builds the pair.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import all_gather_flat
from parallel.grad_sync import AdamWConfig, nbytes
from parallel.grid import group_rank, group_size
from parallel.zero import FlatBucket, ZeroDataParallel, _where


def _recomputing() -> bool:
    """A forward running inside backward is activation checkpointing's recomputation. (Membership in
    `in_backward` is not the test: under pipelining a unit whose reduction waits for other chunks is
    still marked while the next micro-batch's forward runs it, and that forward must hook its output.)"""
    return torch._C._current_graph_task_id() != -1


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors a module returned: the output itself, or those inside its tuples, lists and dicts
    (transformers' ModelOutput is a dict); the backward of whichever of them carries the gradient first
    gathers the unit again."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []


Unit = tuple[list[nn.Parameter], list[tuple[nn.Module, nn.Module]]]


@dataclass
class FrozenShard:
    """The frozen parameters of one unit: views into `flat_params` (whole only while gathered), this
    rank's slice of it kept in `store`."""

    params: list[nn.Parameter]
    flat_params: torch.Tensor
    shard: slice
    store: torch.Tensor
    master: None = None


def frozen_shard(params: list[nn.Parameter], group) -> FrozenShard:
    n = group_size(group)
    numel = sum(p.numel() for p in params)
    size = math.ceil(numel / n)
    flat = torch.zeros(size * n, dtype=params[0].dtype, device=params[0].device)
    offset = 0
    with torch.no_grad():
        for p in params:
            flat[offset : offset + p.numel()].copy_(p.reshape(-1))
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    rank = group_rank(group)
    shard = slice(rank * size, (rank + 1) * size)
    return FrozenShard(params, flat, shard, flat[shard].clone())


@dataclass
class Slot:
    """A unit at one forward position: its trainable bucket and its frozen shard (either may be None)."""

    bucket: FlatBucket | None
    frozen: FrozenShard | None

    def parts(self) -> list:
        return [part for part in (self.bucket, self.frozen) if part is not None]


class ShardedParams:
    """Where ZeRO-3 parameters live: each unit's shard in `bucket.store` (on the host with offload=all),
    the whole unit only between the all-gather before it runs and the free after it (or after its
    gradient is reduced)."""

    def __init__(self, offload_params: bool = False):
        self.offload_params = offload_params
        self.group = None
        self.slots: list[Slot] = []  # by forward position
        self.gathered: dict[int, object] = {}  # id(part) -> pending gather Work, or None once complete
        self.issuing = False  # inside its own all-gather, whose point-to-point form copies into the storage
        self.in_backward: set[int] = set()
        self.frozen_in_backward: set[int] = set()
        self.peak_gathered = 0
        self.uses: dict[int, int] = {}

    # --- the residency interface ZeroDataParallel calls ---------------------------------------------

    def adopt(self, bucket, group) -> None:
        self.group = group
        bucket.store = bucket.flat_params[bucket.shard].clone()
        if self.offload_params:  # offload=all: parameter shards wait in host memory between uses
            bucket.store = bucket.store.to("cpu" if bucket.store.device.type != "meta" else "meta")
            bucket.store._dtrain_host = True
        self._free(bucket)

    def reduced(self, bucket: FlatBucket) -> None:
        """The unit's backward is done and its gradient is being reduced: free its parameters."""
        self.in_backward.discard(id(bucket))
        self._free(bucket)

    def synced(self, buckets: list[FlatBucket]) -> None:
        for bucket in buckets:  # units whose parameters got no gradient this backward
            if id(bucket) in self.in_backward:
                self.in_backward.discard(id(bucket))
                self._free(bucket)
        for frozen in self._frozen():  # backward is over: frozen parts still gathered are not needed
            self._release_frozen(frozen)

    def _frozen(self) -> list[FrozenShard]:
        return [slot.frozen for slot in self.slots if slot.frozen is not None]

    def _release_frozen(self, frozen: FrozenShard | None) -> None:
        if frozen is not None and id(frozen) in self.frozen_in_backward:
            self.frozen_in_backward.discard(id(frozen))
            self._free(frozen)

    def frozen_bytes(self, out) -> None:
        """Add the frozen shards (and any whole frozen unit gathered now) to held-bytes `out`."""
        for frozen in self._frozen():
            out[_where(frozen.flat_params)]["params"] += frozen.flat_params.untyped_storage().nbytes()
            out[_where(frozen.store)]["params"] += nbytes(frozen.store)

    def updated(self, bucket: FlatBucket, group) -> None:
        return None  # the updated shard is gathered on next use

    @contextlib.contextmanager
    def whole(self, buckets: list[FlatBucket]):
        """Every parameter whole for the duration (checkpoints read and write them); written values are
        copied back into the shards."""
        parts = [*buckets, *self._frozen()]
        for part in parts:
            self._ensure(part)
        try:
            yield
        finally:
            for part in parts:
                part.store.copy_(part.flat_params[part.shard].to(part.store.device))
                if part.master is not None and part.master.dtype == part.store.dtype:
                    # fp32 offload: the master mirrors the shard. A 16-bit shard is a rounding of its fp32
                    # master, which load_state_dict restores from the checkpoint instead.
                    part.master.copy_(part.store)
                self._free(part)

    # --- gather and free around the units' forward and backward --------------------------------------

    def hook(self, buckets: list[FlatBucket], units: list[Unit], group) -> None:
        """Buckets are indexed in backward order (reverse of forward), so launching reductions in index
        order follows backward; `slots` maps forward position -> the unit's trainable bucket (None when
        all its parameters are frozen) and frozen shard. The first span of a unit also prefetches the
        next unit; later spans (a tied head) do not."""
        self.group = group
        forward = iter(buckets[::-1])
        for params, _ in units:
            bucket = next(forward) if any(p.requires_grad for p in params) else None
            frozen = [p for p in params if not p.requires_grad]
            shard = self._adopt_frozen(frozen_shard(frozen, group)) if frozen else None
            self.slots.append(Slot(bucket, shard))
        # Forward uses per unit (part id -> spans): each is one all-gather per micro-batch, plus one
        # for backward.
        self.uses = {id(part): len(spans) for slot, (_, spans) in zip(self.slots, units, strict=True)
                     for part in slot.parts()}  # fmt: skip
        for position, (_, spans) in enumerate(units):
            for n, (first, last) in enumerate(spans):
                first.register_forward_pre_hook(
                    lambda m, a, k=position, pf=n == 0: self._before_forward(k, pf)
                )
                last.register_forward_hook(lambda m, a, out, k=position: self._after_forward(k, out))

    def _adopt_frozen(self, frozen: FrozenShard) -> FrozenShard:
        self.adopt(frozen, self.group)
        return frozen

    def _free(self, bucket: FlatBucket) -> None:
        bucket.flat_params.untyped_storage().resize_(0)
        self.gathered.pop(id(bucket), None)

    def _start_gather(self, bucket: FlatBucket) -> None:
        if id(bucket) in self.gathered:
            return
        flat = bucket.flat_params
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        shard = bucket.store.to(flat.device)  # host -> device when parameter shards are offloaded
        self.issuing = True
        try:
            self.gathered[id(bucket)] = all_gather_flat(flat, shard, group=self.group, async_op=True)
        finally:
            self.issuing = False
        self.peak_gathered = max(self.peak_gathered, len(self.gathered))

    def _ensure(self, bucket: FlatBucket) -> None:
        self._start_gather(bucket)
        work = self.gathered[id(bucket)]
        if work is not None:
            work.wait()
            self.gathered[id(bucket)] = None

    def _before_forward(self, position: int, prefetch: bool) -> None:
        for part in self.slots[position].parts():
            self._ensure(part)
        if prefetch and not _recomputing() and position + 1 < len(self.slots):
            for part in self.slots[position + 1].parts():  # prefetch the next unit
                self._start_gather(part)

    def _after_forward(self, position: int, out) -> None:
        if _recomputing():
            return  # recomputation under activation checkpointing: backward still needs the unit
        for tensor in output_tensors(out):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, k=position: self._before_backward_of(k))
        for part in self.slots[position].parts():
            self._free(part)

    def _before_backward_of(self, position: int) -> None:
        slot = self.slots[position]
        if position + 1 < len(self.slots):
            # The unit after this one has produced its input's gradient: its frozen weights are done.
            self._release_frozen(self.slots[position + 1].frozen)
        bucket, frozen = slot.bucket, slot.frozen
        if bucket is not None and bucket.pending == 0 and frozen is None:
            # A unit with several outputs: a gradient arriving after the unit's parameters all got theirs
            # (its reduction is launched and the parameters freed) needs no parameters any more.
            return
        if bucket is not None and bucket.pending > 0:
            self.in_backward.add(id(bucket))
            self._ensure(bucket)
        if frozen is not None:
            self.frozen_in_backward.add(id(frozen))
            self._ensure(frozen)
        if position > 0:
            for part in self.slots[position - 1].parts():  # prefetch the unit before it
                self._start_gather(part)


def zero3(
    units: list[Unit], group: dist.ProcessGroup, adamw: AdamWConfig, offload: str = "none", **facts
) -> ZeroDataParallel:
    """ZeRO-3 over `units`, in forward order: (the unit's parameters, spans). A span (first, last) is a
    stretch of forward that uses the unit: gathered before `first` runs, freed after `last` returns.
    `facts`: ZeroDataParallel's tp_group, pp_group, embed_group, dtypes, isolate (a parameter tied across
    pipeline stages must be a unit of its own) and replica_group (hybrid sharding: units are gathered
    within `group`, gradient shards summed over the replicas once per step)."""
    residency = ShardedParams(offload_params=offload == "all")
    # One bucket per unit with trainable parameters, in backward order; frozen ones go to the residency.
    trainable = [[p for p in params if p.requires_grad] for params, _ in units]
    plan = [params for params in trainable if params][::-1]
    sync = ZeroDataParallel(
        plan, group, 3, adamw, offload in ("optimizer", "all"), residency=residency, **facts
    )
    residency.hook(sync.buckets, units, group)
    return sync

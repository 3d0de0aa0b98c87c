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

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import all_gather_flat
from parallel.grad_sync import AdamWConfig
from parallel.zero import FlatBucket, ZeroDataParallel


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


class ShardedParams:
    """Where ZeRO-3 parameters live: each unit's shard in `bucket.store` (on the host with offload=all),
    the whole unit only between the all-gather before it runs and the free after it (or after its
    gradient is reduced)."""

    def __init__(self, offload_params: bool = False):
        self.offload_params = offload_params
        self.group = None
        self.forward_order: list[FlatBucket] = []
        self.gathered: dict[int, object] = {}  # id(bucket) -> pending gather Work, or None once complete
        self.in_backward: set[int] = set()
        self.peak_gathered = 0
        self.uses: dict[int, int] = {}

    # --- the residency interface ZeroDataParallel calls ---------------------------------------------

    def adopt(self, bucket: FlatBucket, group) -> None:
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

    def after_step(self, buckets: list[FlatBucket], group) -> None:
        pass  # the updated shards are gathered on next use

    @contextlib.contextmanager
    def whole(self, buckets: list[FlatBucket]):
        """Every parameter whole for the duration (checkpoints read and write them); written values are
        copied back into the shards."""
        for bucket in buckets:
            self._ensure(bucket)
        try:
            yield
        finally:
            for bucket in buckets:
                bucket.store.copy_(bucket.flat_params[bucket.shard].to(bucket.store.device))
                if bucket.master is not None and bucket.master.dtype == bucket.store.dtype:
                    # fp32 offload: the master mirrors the shard. A 16-bit shard is a rounding of its fp32
                    # master, which load_state_dict restores from the checkpoint instead.
                    bucket.master.copy_(bucket.store)
                self._free(bucket)

    # --- gather and free around the units' forward and backward --------------------------------------

    def hook(self, buckets: list[FlatBucket], units: list[Unit]) -> None:
        """Buckets are indexed in backward order (reverse of forward), so launching reductions in index
        order follows backward; `forward_order` maps forward position -> bucket. The first span of a unit
        also prefetches the next unit; later spans (a tied head) do not."""
        self.forward_order = buckets[::-1]
        # Forward uses per unit (bucket id -> spans): each is one all-gather per micro-batch, plus one
        # for backward.
        self.uses = {id(b): len(spans) for b, (_, spans) in zip(self.forward_order, units, strict=True)}
        for position, (_, spans) in enumerate(units):
            for n, (first, last) in enumerate(spans):
                first.register_forward_pre_hook(
                    lambda m, a, k=position, pf=n == 0: self._before_forward(k, pf)
                )
                last.register_forward_hook(lambda m, a, out, k=position: self._after_forward(k, out))

    def _free(self, bucket: FlatBucket) -> None:
        bucket.flat_params.untyped_storage().resize_(0)
        self.gathered.pop(id(bucket), None)

    def _start_gather(self, bucket: FlatBucket) -> None:
        if id(bucket) in self.gathered:
            return
        flat = bucket.flat_params
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        shard = bucket.store.to(flat.device)  # host -> device when parameter shards are offloaded
        self.gathered[id(bucket)] = all_gather_flat(flat, shard, group=self.group, async_op=True)
        self.peak_gathered = max(self.peak_gathered, len(self.gathered))

    def _ensure(self, bucket: FlatBucket) -> None:
        self._start_gather(bucket)
        work = self.gathered[id(bucket)]
        if work is not None:
            work.wait()
            self.gathered[id(bucket)] = None

    def _before_forward(self, position: int, prefetch: bool) -> None:
        bucket = self.forward_order[position]
        self._ensure(bucket)
        if prefetch and not _recomputing() and position + 1 < len(self.forward_order):
            self._start_gather(self.forward_order[position + 1])  # prefetch the next unit

    def _after_forward(self, position: int, out) -> None:
        bucket = self.forward_order[position]
        if _recomputing():
            return  # recomputation under activation checkpointing: backward still needs the unit
        for tensor in output_tensors(out):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, k=position: self._before_backward_of(k))
        self._free(bucket)

    def _before_backward_of(self, position: int) -> None:
        bucket = self.forward_order[position]
        if bucket.pending == 0:
            # A unit with several outputs: a gradient arriving after the unit's parameters all got theirs
            # (its reduction is launched and the parameters freed) needs no parameters any more.
            return
        self.in_backward.add(id(bucket))
        self._ensure(bucket)
        if position > 0:
            self._start_gather(self.forward_order[position - 1])  # prefetch the unit before it


def zero3(
    units: list[Unit], group: dist.ProcessGroup, adamw: AdamWConfig, offload: str = "none", **facts
) -> ZeroDataParallel:
    """ZeRO-3 over `units`, in forward order: (the unit's parameters, spans). A span (first, last) is a
    stretch of forward that uses the unit: gathered before `first` runs, freed after `last` returns.
    `facts`: ZeroDataParallel's tp_group, pp_group, embed_group, dtypes and isolate (a parameter tied across
    pipeline stages must be a unit of its own)."""
    residency = ShardedParams(offload_params=offload == "all")
    plan = [params for params, _ in units][::-1]  # one bucket per unit, in backward order
    sync = ZeroDataParallel(
        plan, group, 3, adamw, offload in ("optimizer", "all"), residency=residency, **facts
    )
    residency.hook(sync.buckets, units)
    return sync

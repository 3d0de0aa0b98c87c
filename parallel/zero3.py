"""ZeRO stage 3: parameters sharded too (16/N bytes per parameter for fp32 AdamW, FORMULAS.md).

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
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from parallel.zero import AdamWConfig, FlatBucket, ZeroDataParallel


def _recomputing() -> bool:
    """A forward running inside backward is activation checkpointing's recomputation. (Membership in
    `in_backward` is not the test: under pipelining a unit whose reduction waits for other chunks is
    still marked while the next micro-batch's forward runs it, and that forward must hook its output.)"""
    return torch._C._current_graph_task_id() != -1


class Zero3DataParallel(ZeroDataParallel):
    def __init__(
        self,
        units: list[tuple[list[nn.Parameter], list[tuple[nn.Module, nn.Module]]]],
        group: dist.ProcessGroup,
        adamw: AdamWConfig,
        offload: str = "none",
        decay_if=lambda p: p.dim() >= 2,
        **facts,
    ):
        """units, in forward order: (the unit's parameters, spans). A span (first, last) is a stretch of
        forward that uses the unit: gathered before `first` runs, freed after `last` returns. The first
        span of a unit also prefetches the next unit; later spans (a tied head) do not. `facts`:
        ZeroDataParallel's tp_group and isolate (a tied parameter must be a unit of its own)."""
        self._units = [params for params, _ in units]
        self.offload_params = offload == "all"
        self.gathered: dict[int, object] = {}  # id(bucket) -> pending gather Work, or None once complete
        self.in_backward: set[int] = set()
        self.peak_gathered = 0
        params = [p for ps in self._units for p in ps]
        offload_state = offload in ("optimizer", "all")
        super().__init__(params, group, 3, 0.0, adamw, offload_state, decay_if, **facts)
        # Buckets are indexed in backward order (reverse of forward), so launching reductions in index
        # order follows backward; `forward_order` maps forward position -> bucket.
        self.forward_order = self.buckets[::-1]
        for position, (_, spans) in enumerate(units):
            for n, (first, last) in enumerate(spans):
                first.register_forward_pre_hook(
                    lambda m, a, k=position, pf=n == 0: self._before_forward(k, pf)
                )
                last.register_forward_hook(lambda m, a, out, k=position: self._after_forward(k, out))

    def _plan(self, params, bucket_mb):
        return self._units[::-1]

    def _make_bucket(self, params, decay_if) -> FlatBucket:
        bucket = super()._make_bucket(params, decay_if)
        bucket.store = bucket.flat_params[bucket.shard].clone()
        if self.offload_params:  # offload=all: parameter shards wait in host memory between uses
            bucket.store = bucket.store.to("cpu")
            bucket.store._dtrain_host = True
        self._free(bucket)
        return bucket

    # --- gather and free -------------------------------------------------------------------------------

    def _free(self, bucket: FlatBucket) -> None:
        bucket.flat_params.untyped_storage().resize_(0)
        self.gathered.pop(id(bucket), None)

    def _start_gather(self, bucket: FlatBucket) -> None:
        if id(bucket) in self.gathered:
            return
        flat = bucket.flat_params
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        shard = bucket.store.to(flat.device)  # host -> device when parameter shards are offloaded
        self.gathered[id(bucket)] = dist.all_gather_single(flat, shard, group=self.group, async_op=True)
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
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, k=position: self._before_backward_of(k))
        self._free(bucket)

    def _before_backward_of(self, position: int) -> None:
        bucket = self.forward_order[position]
        self.in_backward.add(id(bucket))
        self._ensure(bucket)
        if position > 0:
            self._start_gather(self.forward_order[position - 1])  # prefetch the unit before it

    def _launch(self, bucket: FlatBucket) -> None:
        super()._launch(bucket)  # the unit's backward is done: reduce its gradient, free its parameters
        self.in_backward.discard(id(bucket))
        self._free(bucket)

    def finish_grad_sync(self) -> None:
        super().finish_grad_sync()
        for bucket in self.buckets:  # units whose parameters got no gradient this backward
            if id(bucket) in self.in_backward:
                self.in_backward.discard(id(bucket))
                self._free(bucket)

    def _after_step(self) -> None:
        pass  # the updated shards are gathered on next use

    @contextlib.contextmanager
    def gathered_params(self):
        """Every parameter whole for the duration (checkpoints read and write them); written values are
        copied back into the shards."""
        for bucket in self.buckets:
            self._ensure(bucket)
        try:
            yield
        finally:
            for bucket in self.buckets:
                bucket.store.copy_(bucket.flat_params[bucket.shard].to(bucket.store.device))
                if bucket.master is not None:
                    bucket.master.copy_(bucket.store)
                self._free(bucket)

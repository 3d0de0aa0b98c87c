"""ZeRO stages 1 and 2 (Rajbhandari et al. 2020) with optional optimizer offload, over one data-parallel
group of N ranks.

Parameters are packed, in backward order, into flat buckets of about `bucket_mb`, each zero-padded to a
multiple of N so rank r owns the equal slice [r*S, (r+1)*S) of every bucket (S = padded size / N); each
parameter becomes a view into its bucket, so one collective moves a whole bucket. Rank r keeps the AdamW
moments (and, offloaded, an fp32 master copy) for its slice only, steps that slice, and all-gathers the
updated bucket: parameters stay whole on every rank (stages 1 and 2), optimizer state is 8/N bytes per
parameter instead of 8.

  stage 1: gradients are accumulated whole over the micro-batches, then each bucket is reduce-scattered
           (SUM) once, at the last micro-batch, launched from gradient hooks as soon as it is complete:
           g_shard_r = [sum over ranks of g]_r. Per rank: 4 (params) + 4 (grads) + 8/N bytes.
  stage 2: each bucket is reduce-scattered after every micro-batch's backward and added into a
           persistent shard; the whole-bucket gradient exists only while the bucket is being filled.
           Per rank: 4 + 12/N bytes (params, gradient shard, moments).

Reduce-scatter plus all-gather move the same bytes as one all-reduce (2 Psi per step, docs/formulas.md).

Hybrid sharding: `group` is one replica's shard group of N ranks and `replica_group` joins the ranks that
hold the same shard in the other replicas. The reduce-scatter then sums a replica's gradients into the
shard; once per step (in finish_grad_sync, after the last micro-batch) each shard is all-reduced (SUM)
over the replica group, which completes the sum over every data-parallel rank. Parameter all-gathers stay
within the shard group; so does the norm's sum of shard squares, since replicas hold identical shards.

With tensor and pipeline parallelism each rank shards *its own* parameters (tensor shards, its stages)
over its dp group. Tensor ranks hold equal shapes in equal order, so their buckets and shards line up
element for element: a gradient that is partial over the tensor group (`Sharding.partial_grad`) is
summed over tp on the reduced shard (the sum commutes with the dp reduce-scatter), and the norm counts a
tensor-replicated element on tensor rank 0 only. A parameter tied across pipeline stages (embedding and
head) gets a bucket of its own on both stages, so both shard it alike and the shards are summed over the
embedding group.

The optimizer is AdamW on flat shards (parallel.flat_adamw). Where whole parameters live is a strategy the
wrapper is composed with: `WholeParams` (stages 1 and 2: all-gather each bucket after the step) or
parallel.zero3.ShardedParams (stage 3: gather a unit just before it runs, free it after). The wrapper is a
`parallel.grad_sync.GradSync`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import all_gather_flat, reduce_scatter_flat
from parallel.data_parallel import plan_buckets
from parallel.flat_adamw import adamw_step_
from parallel.grad_sync import AdamWConfig, Held, OptimizerState, decays, nbytes, no_bytes
from parallel.grid import group_rank, group_size
from parallel.mixed_precision import AS_BUILT, DtypePolicy, fold_grad_
from parallel.precision import wide
from parallel.sharding import counted_on_tp_rank, sharding_of


def _where(t: torch.Tensor) -> str:
    """Offloaded state is a separate host tensor; on a CPU-only machine the "device" is the CPU too, so
    the distinction is by construction (see ZeroDataParallel(offload=...)), not by t.device."""
    return "host" if getattr(t, "_dtrain_host", False) else "device"


@dataclass
class FlatBucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # real elements, without padding
    flat_params: torch.Tensor  # whole (padded) bucket; the parameters are views into it
    shard: slice  # this rank's slice of the padded bucket
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    master: torch.Tensor | None  # offloaded fp32 copy of the shard, or None (the shard is the master)
    grad_shard: torch.Tensor  # this rank's reduced gradient (stage 1: a view into flat_grads)
    flat_grads: torch.Tensor | None = None  # whole-bucket gradient (stage 1: always; stage 2: while filling)
    store: torch.Tensor | None = None  # stage 3: the persistent parameter shard (flat_params is transient)
    partial: list[slice] = field(default_factory=list)  # shard ranges of tensor-partial gradients
    counted: list[slice] = field(default_factory=list)  # shard ranges this rank counts in the norm
    decayed: list[slice] = field(default_factory=list)  # shard ranges weight decay applies to
    pending: int = 0
    work: list = field(default_factory=list)

    @property
    def shard_params(self) -> torch.Tensor:
        return self.store if self.store is not None else self.flat_params[self.shard]


def plan_zero_buckets(
    params: list[nn.Parameter], bucket_bytes: int, isolate: tuple[nn.Parameter, ...] = ()
) -> list[list[nn.Parameter]]:
    """Stage 1/2 buckets of at most `bucket_bytes` in backward order (the reverse of `params`, which is
    registration order); an isolated parameter (tied across pipeline stages) gets a bucket of its own so
    both ends shard it alike. Pure: the estimator calls it on meta parameters."""
    backward = [p for p in params if p.requires_grad][::-1]
    kinds = [id(p) if any(p is q for q in isolate) else None for p in backward]
    plan = plan_buckets([p.numel() * p.element_size() for p in backward], bucket_bytes, kinds)
    return [[backward[i] for i in members] for members in plan]


class WholeParams:
    """Stages 1 and 2: every rank holds the whole parameters; after the step each rank's updated shard
    is all-gathered into every bucket (the all-gather half of the 2 Psi an all-reduce would move).
    `frozen`: parameters outside the buckets (requires_grad False), held whole and only counted."""

    def __init__(self, frozen: list[nn.Parameter] = ()):
        self.frozen = list(frozen)

    def frozen_bytes(self, out: Held) -> None:
        out["device"]["params"] += sum(nbytes(p) for p in self.frozen)

    def adopt(self, bucket: FlatBucket, group) -> None:
        pass

    def reduced(self, bucket: FlatBucket) -> None:
        pass

    def synced(self, buckets: list[FlatBucket]) -> None:
        pass

    def updated(self, bucket: FlatBucket, group):
        # In place: the shard is this rank's chunk of the output, NCCL's in-place all-gather (Gloo copies
        # the input before writing the output). Asynchronous: it runs under the next bucket's update.
        return all_gather_flat(bucket.flat_params, bucket.shard_params, group=group, async_op=True)

    def whole(self, buckets: list[FlatBucket]):
        return contextlib.nullcontext()


class ZeroDataParallel:
    """ZeRO over `group` with a sharded AdamW; a `parallel.grad_sync.GradSync`.

    plan: the flat buckets in backward order (`plan_zero_buckets`, or one per ZeRO-3 unit); stage 1 or 2
    with `WholeParams`, stage 3 with parallel.zero3.ShardedParams as `residency`. tp_group: partial
    gradients and norm counting; pp_group: the norm sums over stages; embed_group and `isolate`: the
    parameters tied across the pipeline's ends, summed over that group; replica_group: the same shard
    in every other replica of `group` (hybrid sharding), None for one replica."""

    def __init__(
        self,
        plan: list[list[nn.Parameter]],
        group: dist.ProcessGroup,
        stage: int,
        adamw: AdamWConfig,
        offload: bool = False,
        *,
        residency=None,
        tp_group=None,
        pp_group=None,
        embed_group=None,
        isolate: tuple[nn.Parameter, ...] = (),
        replica_group=None,
        dtypes: DtypePolicy = AS_BUILT,
    ):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, not {stage}")
        self.group, self.stage, self.adamw, self.offload = group, stage, adamw, offload
        self.residency = residency if residency is not None else WholeParams()
        self.n, self.rank = group_size(group), group_rank(group)
        self.tp_group = tp_group if group_size(tp_group) > 1 else None
        self.tp_rank = group_rank(self.tp_group)
        self.pp_group, self.embed_group = pp_group, embed_group
        self.replica_group = replica_group if group_size(replica_group) > 1 else None
        self.isolate = isolate
        self.dtypes = dtypes
        self.sync_grads = True
        self.step_count = 0
        self.buckets = [self._make_bucket(members) for members in plan]
        # Each hook is bound to its bucket, offset and position: no lookup by parameter (a Python-level
        # tensor hash) on every gradient of every step.
        self._n_params = 0
        for b, bucket in enumerate(self.buckets):
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                p.register_post_accumulate_grad_hook(
                    functools.partial(self._grad_ready, b, offset, self._n_params)
                )
                self._n_params += 1
        self._reset()

    def _shard_ranges(self, bucket: FlatBucket, predicate) -> list[slice]:
        """Ranges of this rank's shard covered by the parameters for which predicate(param) holds,
        adjacent ones merged (usually one range per bucket: one kernel, not one per parameter)."""
        lo, hi = bucket.shard.start, bucket.shard.stop
        ranges: list[slice] = []
        for p, offset in zip(bucket.params, bucket.offsets, strict=True):
            start, stop = max(offset, lo) - lo, min(offset + p.numel(), hi) - lo
            if start >= stop or not predicate(p):
                continue
            if ranges and ranges[-1].stop == start:
                ranges[-1] = slice(ranges[-1].start, stop)
            else:
                ranges.append(slice(start, stop))
        return ranges

    def _counted_here(self, p: nn.Parameter) -> bool:
        return counted_on_tp_rank(sharding_of(p), self.tp_rank)  # global_grad_norm's rule

    def _make_bucket(self, params: list[nn.Parameter]) -> FlatBucket:
        numel = sum(p.numel() for p in params)
        padded = math.ceil(numel / self.n) * self.n
        size = padded // self.n
        dtype, device = params[0].dtype, params[0].device  # the master dtype: fp32 (fp64 in exactness tests)
        compute, grad_dtype = self.dtypes.compute(dtype), self.dtypes.grads(dtype)
        flat = torch.zeros(padded, dtype=dtype, device=device)
        offsets, offset = [], 0
        with torch.no_grad():
            for p in params:
                flat[offset : offset + p.numel()].copy_(p.reshape(-1))
                offsets.append(offset)
                offset += p.numel()
        shard = slice(self.rank * size, (self.rank + 1) * size)
        # Offloaded optimizer state lives in host memory (on the meta device, the estimator's, it stays
        # there): moments and a master copy of the shard, in the master dtype. With 16-bit parameters the
        # fp32 master shard always exists (parallel.mixed_precision) and the bucket itself is 16-bit.
        host = torch.device("cpu") if device.type != "meta" else device
        state_device = host if self.offload else device
        mixed = compute != dtype
        master = flat[shard].detach().to(state_device, copy=True) if self.offload or mixed else None
        if mixed:
            flat = flat.to(compute)
        with torch.no_grad():
            for p, offset in zip(params, offsets, strict=True):
                p.data = flat[offset : offset + p.numel()].view_as(p)  # the parameter now lives in the bucket
        # Stage 1 keeps whole gradients for the step and reduces into its own slice of them; stages 2 and 3
        # keep only a shard and fill a whole-bucket buffer transiently.
        flat_grads = torch.zeros(padded, dtype=grad_dtype, device=device) if self.stage == 1 else None
        grad_shard = (
            flat_grads[shard]
            if flat_grads is not None
            else torch.zeros(size, dtype=grad_dtype, device=device)
        )
        bucket = FlatBucket(
            params=params,
            offsets=offsets,
            numel=numel,
            flat_params=flat,
            shard=shard,
            exp_avg=torch.zeros(size, dtype=dtype, device=state_device),
            exp_avg_sq=torch.zeros(size, dtype=dtype, device=state_device),
            master=master,
            grad_shard=grad_shard,
            flat_grads=flat_grads,
        )
        if flat_grads is not None and grad_dtype == compute:
            # Stage 1: autograd accumulates micro-batches straight into the bucket (as DataParallel does;
            # 16-bit parameters with fp32 gradients fold each backward's gradient in from the hook).
            for p, offset in zip(params, offsets, strict=True):
                p.grad = flat_grads[offset : offset + p.numel()].view_as(p)
        if self.offload:
            for t in (bucket.exp_avg, bucket.exp_avg_sq, bucket.master):
                t._dtrain_host = True
        if self.tp_group is not None:
            bucket.partial = self._shard_ranges(bucket, lambda p: sharding_of(p).partial_grad)
        bucket.counted = self._shard_ranges(bucket, self._counted_here)
        bucket.decayed = self._shard_ranges(bucket, decays)
        self.residency.adopt(bucket, self.group)
        return bucket

    # --- gradients ------------------------------------------------------------------------------------

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
        self._next_launch = 0
        self._final = [False] * self._n_params  # by position: this parameter's gradient is final

    def _flat_grads(self, bucket: FlatBucket) -> torch.Tensor:
        if bucket.flat_grads is None:
            bucket.flat_grads = torch.zeros_like(bucket.flat_params, dtype=bucket.grad_shard.dtype)
        return bucket.flat_grads

    def _grad_ready(self, b: int, offset: int, position: int, param: nn.Parameter) -> None:
        """Move the gradient into its bucket; launch complete buckets' reduce-scatters in index order
        (the same order on every rank)."""
        bucket = self.buckets[b]
        if self.stage >= 2 or bucket.grad_shard.dtype != param.dtype:
            # Stage 1's gradients are views into its persistent bucket already, unless 16-bit parameters
            # accumulate into fp32 buckets; otherwise the (transient) bucket takes the gradient over.
            fold_grad_(param, self._flat_grads(bucket)[offset : offset + param.numel()])
        if not (self.sync_grads or self.stage >= 2):
            return  # stage 1 accumulates whole gradients until the last micro-batch
        if self._final[position]:
            raise RuntimeError(
                "a parameter's gradient became final twice in one step; call finish_grad_sync()"
            )
        self._final[position] = True
        bucket.pending -= 1
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: FlatBucket) -> None:
        grads = self._flat_grads(bucket)
        # Stage 1 reduces in place, into its own slice of the whole gradients (NCCL's in-place form; Gloo
        # reduces a copy of the input); stages 2, 3 into a new tensor that is added to the shard.
        out = bucket.grad_shard if self.stage == 1 else torch.empty_like(bucket.grad_shard)
        work = reduce_scatter_flat(out, grads, group=self.group, async_op=True)
        bucket.work.append((work, out))
        self.residency.reduced(bucket)

    def before_backward(self, is_last: bool) -> None:
        """Called before each backward of the step. Stages 2 and 3 first complete the previous backward's
        reductions (whatever buckets it filled: the sum is linear, so partial buckets reduce correctly),
        then reduce as they go; stage 1 reduces only during the last backward."""
        if self.stage >= 2:
            self._complete_reductions()
        self.sync_grads = is_last or self.stage >= 2

    def _complete_reductions(self) -> None:
        """Complete the reductions into the gradient shards. Stage 1: the shard (a slice of the whole
        gradient) is replaced by its reduced value; stages 2, 3: the reduction is added to the persistent
        shard and the whole-bucket buffer is freed."""
        for bucket in self.buckets[self._next_launch :]:
            if bucket.flat_grads is not None:
                self._launch(bucket)
        for bucket in self.buckets:
            for work, out in bucket.work:
                work.wait()
                if self.stage > 1:
                    bucket.grad_shard.add_(out)
            bucket.work = []
            if self.stage >= 2:
                bucket.flat_grads = None
        self.residency.synced(self.buckets)
        self._reset()

    def finish_grad_sync(self) -> None:
        self._complete_reductions()
        self._sum_over_replicas()
        self._sum_partial_grads()
        if self.isolate:
            # Both pipeline ends bucket a tied parameter alone, so their shards hold the same elements.
            for bucket in self.buckets:
                if any(bucket.params[0] is p for p in self.isolate):
                    dist.all_reduce(bucket.grad_shard, group=self.embed_group)

    def _sum_over_replicas(self) -> None:
        """grad_shard <- sum over the replica group: one all-reduce per bucket, all in flight at once (the
        same shard index on every member, so the elements line up)."""
        if self.replica_group is None:
            return
        works = [dist.all_reduce(b.grad_shard, group=self.replica_group, async_op=True) for b in self.buckets]
        for work in works:
            work.wait()

    def _sum_partial_grads(self) -> None:
        """grad <- sum over the tensor group on the ranges of tensor-partial gradients (one all-reduce)."""
        pieces = [b.grad_shard[r] for b in self.buckets for r in b.partial]
        if not pieces:
            return
        flat = torch.cat(pieces)
        dist.all_reduce(flat, group=self.tp_group)
        offset = 0
        for piece in pieces:
            piece.copy_(flat[offset : offset + piece.numel()])
            offset += piece.numel()

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            (bucket.flat_grads if self.stage == 1 else bucket.grad_shard).zero_()

    def held_bytes(self) -> Held:
        out = no_bytes()
        for b in self.buckets:
            # Storage actually allocated: a stage-3 bucket's whole buffer is empty between uses, and its
            # persistent shard may wait in host memory (offload=all).
            out[_where(b.flat_params)]["params"] += b.flat_params.untyped_storage().nbytes()
            if b.store is not None:
                out[_where(b.store)]["params"] += nbytes(b.store)
            grads = b.flat_grads if self.stage == 1 else b.grad_shard
            out[_where(grads)]["grads"] += nbytes(grads)
            for t in (b.exp_avg, b.exp_avg_sq, b.master):
                if t is not None:
                    out[_where(t)]["optimizer"] += nbytes(t)
        self.residency.frozen_bytes(out)
        return out

    # --- norm, clipping, step -------------------------------------------------------------------------

    def grad_norm_sq(self) -> torch.Tensor:
        """Sum of squares of this rank's gradient shards (padding is zero), over the elements this rank
        counts."""
        total = torch.zeros(
            (), dtype=wide(self.buckets[0].grad_shard).dtype, device=self.buckets[0].grad_shard.device
        )
        for bucket in self.buckets:
            for r in bucket.counted:
                total += wide(bucket.grad_shard[r]).pow(2).sum()
        return total

    def reduced_grad_norm_sq(self) -> torch.Tensor:
        """||g||^2 of this rank's parameters (its tensor shards, its stages): shard squares summed over
        the group."""
        total = self.grad_norm_sq()
        if self.n > 1:
            dist.all_reduce(total, group=self.group)
        return total

    def grad_norm(self) -> torch.Tensor:
        return model_parallel_norm(self.reduced_grad_norm_sq(), self.tp_group, self.pp_group)

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        for bucket in self.buckets:
            bucket.grad_shard.mul_(factor)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on every shard; after each bucket's, the residency starts making its parameters whole
        again where it must, and the step waits for all of them at its end."""
        self.step_count += 1
        pending = []
        for bucket in self.buckets:
            param = bucket.master if bucket.master is not None else bucket.shard_params
            grad = bucket.grad_shard.to(param.device, param.dtype)
            adamw_step_(
                param,
                grad,
                bucket.exp_avg,
                bucket.exp_avg_sq,
                bucket.decayed,
                lr,
                self.step_count,
                self.adamw,
            )
            if bucket.master is not None:
                bucket.shard_params.copy_(bucket.master)
            pending.append(self.residency.updated(bucket, self.group))
        for work in pending:
            if work is not None:
                work.wait()

    def params_whole(self):
        return self.residency.whole(self.buckets)

    # --- canonical state for checkpoints -----------------------------------------------------------------

    def state_dict(self) -> OptimizerState:
        """Every parameter's AdamW state, whole (gathered over the group), as torch's AdamW would hold it.
        Under stage 3 call it inside params_whole()."""
        out = {}
        for bucket in self.buckets:
            gathered = {
                name: self._gather_whole(bucket, getattr(bucket, name)) for name in ("exp_avg", "exp_avg_sq")
            }
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                out[p] = {k: v[offset : offset + p.numel()].view_as(p).clone() for k, v in gathered.items()}
                out[p]["step"] = torch.tensor(float(self.step_count))
        return out

    def _gather_whole(self, bucket: FlatBucket, local: torch.Tensor) -> torch.Tensor:
        """The whole bucket of a per-shard state tensor (moments, masters), in its own dtype, all-gathered
        over the group on the parameters' device."""
        local = local.to(bucket.flat_params.device)
        whole = torch.empty(bucket.flat_params.numel(), dtype=local.dtype, device=local.device)
        all_gather_flat(whole, local.contiguous(), group=self.group)
        return whole

    def master_weights(self) -> dict[nn.Parameter, torch.Tensor]:
        """The fp32 master weights of 16-bit parameters, whole (gathered over the group); empty when the
        parameters are their own masters."""
        out = {}
        for bucket in self.buckets:
            if bucket.master is None or bucket.master.dtype == bucket.flat_params.dtype:
                continue
            whole = self._gather_whole(bucket, bucket.master)
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                out[p] = whole[offset : offset + p.numel()].view_as(p).clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: OptimizerState) -> None:
        """Inverse of state_dict: take this rank's slice of every parameter's moments (inside
        params_whole() under stage 3, after the parameters were loaded)."""
        for bucket in self.buckets:
            saved_master = any("master" in state.get(p, {}) for p in bucket.params)
            names = ["exp_avg", "exp_avg_sq"] + (
                ["master"] if bucket.master is not None and saved_master else []
            )
            for name in names:
                target = getattr(bucket, name)
                whole = torch.zeros(bucket.flat_params.numel(), dtype=target.dtype, device=target.device)
                for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                    if name in state.get(p, {}):
                        whole[offset : offset + p.numel()] = state[p][name].reshape(-1)
                target.copy_(whole[bucket.shard])
            if bucket.master is not None and not saved_master:
                bucket.master.copy_(bucket.shard_params)  # the master is the loaded parameter
        steps = [int(s["step"]) for s in state.values() if "step" in s]
        self.step_count = steps[0] if steps else 0


def model_parallel_norm(sq: torch.Tensor, tp_group, pp_group) -> torch.Tensor:
    """sqrt of ||g||^2 summed over tensor and pipeline ranks, which hold disjoint counted elements."""
    for group in (tp_group, pp_group):
        if group_size(group) > 1:
            dist.all_reduce(sq, group=group)
    return sq.sqrt()

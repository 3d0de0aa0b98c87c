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

Reduce-scatter plus all-gather move the same bytes as one all-reduce (2 Psi per step, FORMULAS.md).

With tensor and pipeline parallelism each rank shards *its own* parameters (tensor shards, its stages)
over its dp group. Tensor ranks hold equal shapes in equal order, so their buckets and shards line up
element for element: a gradient that is partial over the tensor group (`Sharding.partial_grad`) is
summed over tp on the reduced shard (the sum commutes with the dp reduce-scatter), and the norm counts a
tensor-replicated element on tensor rank 0 only. A parameter tied across pipeline stages (embedding and
head) gets a bucket of its own on both stages, so both shard it alike and the shards are summed over the
embedding group.

The optimizer is AdamW written on flat shards with torch.optim.AdamW's single-tensor arithmetic, element
for element, so a rank's update equals what torch's would be on the same gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from parallel.data_parallel import plan_buckets
from parallel.sharding import counted_on_tp_rank, sharding_of


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _where(t: torch.Tensor) -> str:
    """Offloaded state is a separate host tensor; on a CPU-only machine the "device" is the CPU too, so
    the distinction is by construction (see ZeroDataParallel(offload=...)), not by t.device."""
    return "host" if getattr(t, "_dtrain_host", False) else "device"


@dataclass
class AdamWConfig:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass
class FlatBucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # real elements, without padding
    flat_params: torch.Tensor  # whole (padded) bucket; the parameters are views into it
    shard: slice  # this rank's slice of the padded bucket
    decay: torch.Tensor  # per element of the shard: weight decay applies (1.0) or not (0.0)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    master: torch.Tensor | None  # offloaded fp32 copy of the shard, or None (the shard is the master)
    grad_shard: torch.Tensor  # this rank's reduced gradient (stage 1: a view into flat_grads)
    flat_grads: torch.Tensor | None = None  # whole-bucket gradient (stage 1: always; stage 2: while filling)
    store: torch.Tensor | None = None  # stage 3: the persistent parameter shard (flat_params is transient)
    partial: list[slice] = field(default_factory=list)  # shard ranges of tensor-partial gradients
    counted: list[slice] = field(default_factory=list)  # shard ranges this rank counts in the norm
    pending: int = 0
    work: list = field(default_factory=list)

    @property
    def shard_params(self) -> torch.Tensor:
        return self.store if self.store is not None else self.flat_params[self.shard]


class ZeroDataParallel:
    """Stage 1 or 2 data parallelism with a sharded AdamW. Same interface as DataParallel for the
    trainer (`sync_grads`, `finish_grad_sync`, `zero_grad`), plus `grad_norm_sq`, `clip` and `step`."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group: dist.ProcessGroup,
        stage: int,
        bucket_mb: float,
        adamw: AdamWConfig,
        offload: bool = False,
        decay_if=lambda p: p.dim() >= 2,
        *,
        tp_group: dist.ProcessGroup | None = None,
        isolate: tuple[nn.Parameter, ...] = (),
    ):
        """tp_group: the tensor group (partial gradients, norm counting); isolate: parameters that get a
        bucket of their own (tied across pipeline stages)."""
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, not {stage}")
        self.group, self.stage, self.adamw, self.offload = group, stage, adamw, offload
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.tp_group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
        self.tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        self.isolate = set(isolate)
        self.sync_grads = True
        self.step_count = 0
        self.buckets = [self._make_bucket(members, decay_if) for members in self._plan(params, bucket_mb)]
        # Parameter -> (bucket index, offset in the bucket); dict lookups hash tensors by identity.
        self._place = {
            p: (b, offset)
            for b, bucket in enumerate(self.buckets)
            for p, offset in zip(bucket.params, bucket.offsets, strict=True)
        }
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self._reset()

    def _plan(self, params: list[nn.Parameter], bucket_mb: float) -> list[list[nn.Parameter]]:
        """Buckets of about bucket_mb in backward order (the reverse of registration order)."""
        params = [p for p in params if p.requires_grad][::-1]
        # An isolated parameter is a kind of its own, so bucket boundaries fall on both sides of it.
        kinds = [id(p) if p in self.isolate else None for p in params]
        plan = plan_buckets([p.numel() * p.element_size() for p in params], int(bucket_mb * 2**20), kinds)
        return [[params[i] for i in members] for members in plan]

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

    def _make_bucket(self, params: list[nn.Parameter], decay_if) -> FlatBucket:
        numel = sum(p.numel() for p in params)
        padded = math.ceil(numel / self.n) * self.n
        size = padded // self.n
        dtype, device = params[0].dtype, params[0].device
        flat = torch.zeros(padded, dtype=dtype, device=device)
        decay_full = torch.zeros(padded, dtype=dtype)
        offsets, offset = [], 0
        with torch.no_grad():
            for p in params:
                flat[offset : offset + p.numel()].copy_(p.reshape(-1))
                p.data = flat[offset : offset + p.numel()].view_as(p)  # the parameter now lives in the bucket
                decay_full[offset : offset + p.numel()] = 1.0 if decay_if(p) else 0.0
                offsets.append(offset)
                offset += p.numel()
        shard = slice(self.rank * size, (self.rank + 1) * size)
        host = torch.device("cpu") if self.offload else device
        # Offloaded optimizer state lives in host memory: moments and a master copy of the shard, in the
        # parameters' dtype (they are the fp32 master weights; compute runs in 16 bits under autocast).
        master = flat[shard].detach().to(host, copy=True) if self.offload else None
        state_dtype = dtype
        # Stage 1 keeps whole gradients for the step and reduces into its own slice of them; stage 2 keeps
        # only a shard and fills a whole-bucket buffer transiently.
        flat_grads = torch.zeros_like(flat) if self.stage == 1 else None
        grad_shard = (
            flat_grads[shard] if flat_grads is not None else torch.zeros(size, dtype=dtype, device=device)
        )
        bucket = FlatBucket(
            params=params,
            offsets=offsets,
            numel=numel,
            flat_params=flat,
            shard=shard,
            decay=decay_full[shard].to(host, state_dtype),
            exp_avg=torch.zeros(size, dtype=state_dtype, device=host),
            exp_avg_sq=torch.zeros(size, dtype=state_dtype, device=host),
            master=master,
            grad_shard=grad_shard,
            flat_grads=flat_grads,
        )
        if flat_grads is not None:
            # Stage 1: autograd accumulates micro-batches straight into the bucket (as DataParallel does).
            for p, offset in zip(params, offsets, strict=True):
                p.grad = flat_grads[offset : offset + p.numel()].view_as(p)
        if self.offload:
            for t in (bucket.decay, bucket.exp_avg, bucket.exp_avg_sq, bucket.master):
                t._dtrain_host = True
        if self.tp_group is not None:
            bucket.partial = self._shard_ranges(bucket, lambda p: sharding_of(p).partial_grad)
        bucket.counted = self._shard_ranges(bucket, self._counted_here)
        return bucket

    # --- gradients ------------------------------------------------------------------------------------

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
        self._next_launch = 0
        self._ready: set[nn.Parameter] = set()

    def _flat_grads(self, bucket: FlatBucket) -> torch.Tensor:
        if bucket.flat_grads is None:
            bucket.flat_grads = torch.zeros_like(bucket.flat_params)
        return bucket.flat_grads

    def _grad_ready(self, param: nn.Parameter) -> None:
        """Move the gradient into its bucket; launch complete buckets' reduce-scatters in index order
        (the same order on every rank)."""
        b, offset = self._place[param]
        bucket = self.buckets[b]
        if self.stage >= 2:  # stage 1's gradients are views into its persistent bucket already
            self._flat_grads(bucket)[offset : offset + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None  # the transient bucket holds it now
        if not (self.sync_grads or self.stage == 2):
            return  # stage 1 accumulates whole gradients until the last micro-batch
        if param in self._ready:
            raise RuntimeError(
                "a parameter's gradient became final twice in one step; call finish_grad_sync()"
            )
        self._ready.add(param)
        bucket.pending -= 1
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: FlatBucket) -> None:
        grads = self._flat_grads(bucket)
        out = torch.empty_like(bucket.grad_shard)
        work = dist.reduce_scatter_single(out, grads, group=self.group, async_op=True)
        bucket.work.append((work, out))

    def before_backward(self, is_last: bool) -> None:
        """Called before each backward of the step. Stage 2 first completes the previous backward's
        reductions (whatever buckets it filled: the sum is linear, so partial buckets reduce correctly),
        then reduces as it goes; stage 1 reduces only during the last backward."""
        if self.stage >= 2:
            self.finish_grad_sync()
        self.sync_grads = is_last or self.stage >= 2

    def finish_grad_sync(self) -> None:
        """Complete the reductions into the gradient shards. Stage 1: the shard (a slice of the whole
        gradient) is replaced by its reduced value; stage 2: the reduction is added to the persistent
        shard and the whole-bucket buffer is freed."""
        for bucket in self.buckets[self._next_launch :]:
            if bucket.flat_grads is not None:
                self._launch(bucket)
        for bucket in self.buckets:
            for work, out in bucket.work:
                work.wait()
                if self.stage == 1:
                    bucket.grad_shard.copy_(out)
                else:
                    bucket.grad_shard.add_(out)
            bucket.work = []
            if self.stage >= 2:
                bucket.flat_grads = None
        self._reset()

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            (bucket.flat_grads if self.stage == 1 else bucket.grad_shard).zero_()

    def held_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes of parameters, gradients and optimizer states this rank holds, counted from the real
        tensors, by where they live ("device" or "host")."""
        out = {
            "device": {"params": 0, "grads": 0, "optimizer": 0},
            "host": {"params": 0, "grads": 0, "optimizer": 0},
        }
        for b in self.buckets:
            # Storage actually allocated: a stage-3 bucket's whole buffer is empty between uses, and its
            # persistent shard may wait in host memory (offload=all).
            out[_where(b.flat_params)]["params"] += b.flat_params.untyped_storage().nbytes()
            if b.store is not None:
                out[_where(b.store)]["params"] += _nbytes(b.store)
            grads = b.flat_grads if self.stage == 1 else b.grad_shard
            out[_where(grads)]["grads"] += _nbytes(grads)
            for t in (b.exp_avg, b.exp_avg_sq, b.master):
                if t is not None:
                    out[_where(t)]["optimizer"] += _nbytes(t)
        return out

    # --- norm, clipping, step -------------------------------------------------------------------------

    def sum_partial_grads(self) -> None:
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

    def sum_isolated_grads(self, group: dist.ProcessGroup) -> None:
        """Sum the gradient shards of the isolated (tied) parameters over `group`: both ends bucket them
        alone, so their shards hold the same elements."""
        for bucket in self.buckets:
            if bucket.params[0] in self.isolate:
                dist.all_reduce(bucket.grad_shard, group=group)

    def grad_norm_sq(self) -> torch.Tensor:
        """Sum of squares of this rank's gradient shards (padding is zero), over the elements this rank
        counts; all-reduce it over the group to get ||g||^2 of this rank's parameters (the caller also
        reduces over tensor and pipeline groups)."""
        total = torch.zeros(
            (), dtype=self.buckets[0].grad_shard.dtype, device=self.buckets[0].grad_shard.device
        )
        for bucket in self.buckets:
            for r in bucket.counted:
                total += bucket.grad_shard[r].pow(2).sum()
        return total

    def reduced_grad_norm_sq(self) -> torch.Tensor:
        """||g||^2 of the parameters this wrapper holds: the shard squares summed over the group."""
        total = self.grad_norm_sq()
        if self.n > 1:
            dist.all_reduce(total, group=self.group)
        return total

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        for bucket in self.buckets:
            bucket.grad_shard.mul_(factor)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on every shard, element for element as torch.optim.AdamW's single-tensor path, then
        all-gather the updated buckets."""
        a = self.adamw
        beta1, beta2 = a.betas
        self.step_count += 1
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = (1 - beta2**self.step_count) ** 0.5
        step_size = lr / bias_correction1
        for bucket in self.buckets:
            param = bucket.master if bucket.master is not None else bucket.shard_params
            grad = bucket.grad_shard.to(param.device, param.dtype)
            # Decoupled weight decay p *= 1 - lr*wd on decayed elements (the same fp32 factor as torch's).
            param.mul_(torch.where(bucket.decay > 0, 1 - lr * a.weight_decay, 1.0).to(param.dtype))
            bucket.exp_avg.lerp_(grad, 1 - beta1)
            bucket.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (bucket.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(a.eps)
            param.addcdiv_(bucket.exp_avg, denom, value=-step_size)
            if bucket.master is not None:
                bucket.shard_params.copy_(bucket.master)
        self._after_step()

    def _after_step(self) -> None:
        """Stages 1-2: every rank needs the whole updated parameters (stage 3 gathers them on use)."""
        for bucket in self.buckets:
            dist.all_gather_single(bucket.flat_params, bucket.shard_params.clone(), group=self.group)

    # --- canonical state for checkpoints -----------------------------------------------------------------

    def full_state(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Every parameter's AdamW state, whole (gathered over the group), as torch's AdamW would hold it."""
        out = {}
        for bucket in self.buckets:
            gathered = {}
            for name in ("exp_avg", "exp_avg_sq"):
                local = getattr(bucket, name).to(bucket.flat_params.device, bucket.flat_params.dtype)
                whole = torch.empty_like(bucket.flat_params)
                dist.all_gather_single(whole, local.contiguous(), group=self.group)
                gathered[name] = whole
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                out[p] = {k: v[offset : offset + p.numel()].view_as(p).clone() for k, v in gathered.items()}
                out[p]["step"] = torch.tensor(float(self.step_count))
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[nn.Parameter, dict[str, torch.Tensor]]) -> None:
        """Inverse of full_state: take this rank's slice of every parameter's moments."""
        for bucket in self.buckets:
            for name in ("exp_avg", "exp_avg_sq"):
                whole = torch.zeros_like(bucket.flat_params)
                for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                    if p in state:
                        whole[offset : offset + p.numel()] = state[p][name].reshape(-1)
                getattr(bucket, name).copy_(whole[bucket.shard])
            if bucket.master is not None:
                bucket.master.copy_(bucket.shard_params)
        steps = [int(s["step"]) for s in state.values() if "step" in s]
        self.step_count = steps[0] if steps else 0

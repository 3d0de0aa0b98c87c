"""Data parallelism, hand-written: bucketed gradient all-reduce overlapped with backward.

Every data-parallel rank runs the whole model on its own slice of the global batch. The trainer divides
each micro-batch's token-loss sum by the token count of the *global* batch, so the gradient of the global
loss is the plain sum of every rank's local gradient:

    g = sum_r g_r              (all-reduce SUM over dp_group, no division here)

Gradients live in flat fp32 buckets of about `bucket_mb` MB, filled in backward order (the reverse of
registration order, the order in which autograd produces them). `param.grad` is a view into its bucket,
so autograd accumulates micro-batches in place and the bucket is all-reduced with one collective. A
post-accumulate-grad hook counts the parameters of a bucket as they finish; when a bucket is complete its
all-reduce is launched asynchronously, overlapping the rest of backward. Buckets are launched strictly in
index order on every rank, so the collectives match across ranks even if hooks fire in another order.
On non-final micro-batches of an accumulation (`no_sync`) nothing is communicated.

Expert parameters (`sharding.expert`) are held by one rank of each expert-parallel group, so their
gradients are summed over the expert-data-parallel group instead (the ranks holding the same experts;
the all-to-all backward has already summed the contributions of the ep group's tokens). They get
buckets of their own, cut where the parameter kind changes along the backward order.

`DataParallelAdamW` is the `parallel.grad_sync.GradSync` built on it: these buckets, torch's own AdamW on
the whole parameters, and the sums that make gradients final before the norm (tensor-partial gradients
over tp, a head tied to the first stage's embedding over the embedding group).
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.grad_sync import AdamWConfig, Held, OptimizerState, decays, nbytes, no_bytes
from parallel.grid import group_size
from parallel.mixed_precision import AS_BUILT, DtypePolicy, fold_grad_, master_copies, to_compute_
from parallel.sharding import global_grad_norm, sharding_of, sum_partial_grads


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor
    group: dist.ProcessGroup
    pending: int = 0  # parameters of this bucket whose gradient is not final yet in this backward
    work: dist.Work | None = None


def plan_buckets(sizes_bytes: list[int], bucket_bytes: int, kinds: list | None = None) -> list[list[int]]:
    """Greedy split of parameters (given in backward order) into consecutive buckets of at most
    `bucket_bytes` (a parameter larger than that gets a bucket of its own); with `kinds`, a bucket also
    ends where the kind changes (expert and dense gradients are reduced over different groups)."""
    buckets: list[list[int]] = []
    current, filled = [], 0
    for i, size in enumerate(sizes_bytes):
        new_kind = kinds is not None and current and kinds[i] != kinds[current[-1]]
        if current and (filled + size > bucket_bytes or new_kind):
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets


class DataParallel(nn.Module):
    """Wraps a module; gradients of its parameters are summed over `group` after the last micro-batch.

    Use `no_sync()` around the backward passes of non-final micro-batches, `finish_grad_sync()` after
    the final backward (it waits for every bucket), and `zero_grad()` instead of the optimizer's (the
    gradients are views into the buckets and must stay so).
    """

    def __init__(
        self,
        module: nn.Module,
        group: dist.ProcessGroup,
        bucket_mb: float = 25.0,
        expert_group: dist.ProcessGroup | None = None,
        grad_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.module = module
        self.sync_grads = True
        params = [p for p in module.parameters() if p.requires_grad]
        params.reverse()  # backward order
        # Gradients are reduced in fp32 unless `grad_dtype` says otherwise (fp64 parameters, used by the
        # exactness tests, keep fp64). 16-bit parameters with fp32 buckets fold each param.grad into its
        # bucket slice from the hook (parallel.mixed_precision); `main_grads` maps them to that slice.
        dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
        dtype = grad_dtype or dtype
        is_expert = [sharding_of(p).expert and expert_group is not None for p in params]
        plan = plan_buckets([p.numel() * 4 for p in params], int(bucket_mb * 2**20), is_expert)
        self.buckets: list[Bucket] = []
        self._n_params = 0
        self.main_grads: dict[nn.Parameter, torch.Tensor] = {}
        for b, members in enumerate(plan):
            bucket_params = [params[i] for i in members]
            total = sum(p.numel() for p in bucket_params)
            buffer = torch.zeros(total, dtype=dtype, device=bucket_params[0].device)
            bucket = Bucket(bucket_params, buffer, expert_group if is_expert[members[0]] else group)
            offset = 0
            for p in bucket_params:
                if p.dtype != dtype and grad_dtype is None:
                    raise TypeError(f"DataParallel keeps {dtype} parameters (master weights); got {p.dtype}")
                view = bucket.buffer[offset : offset + p.numel()].view_as(p)
                if p.dtype == dtype:
                    p.grad = view
                else:
                    self.main_grads[p] = view
                offset += p.numel()
                # The hook is bound to its bucket and position: no lookup by parameter (a Python-level
                # tensor hash) on every gradient of every step.
                hook = functools.partial(self._grad_ready, b, self._n_params, self.main_grads.get(p))
                p.register_post_accumulate_grad_hook(hook)
                self._n_params += 1
            self.buckets.append(bucket)
        self._reset()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        previous, self.sync_grads = self.sync_grads, False
        try:
            yield
        finally:
            self.sync_grads = previous

    def before_backward(self, is_last: bool) -> None:
        """Reduce only during the last backward of the step (no_sync before it)."""
        self.sync_grads = is_last

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.pending, bucket.work = len(bucket.params), None
        self._next_launch = 0
        self._final = [False] * self._n_params  # by position: this parameter's gradient is final

    def _grad_ready(
        self, bucket_index: int, position: int, main: torch.Tensor | None, param: nn.Parameter
    ) -> None:
        if main is not None:
            fold_grad_(param, main)
        if not self.sync_grads:
            return
        if self._final[position]:
            # A second final gradient for one parameter in one step (reentrant checkpointing, or two
            # synchronising backwards without finish_grad_sync) may land after its bucket was reduced.
            raise RuntimeError(
                "a parameter's gradient became final twice in one step; call finish_grad_sync()"
            )
        self._final[position] = True
        bucket = self.buckets[bucket_index]
        bucket.pending -= 1
        # Launch every complete bucket in index order; a later bucket that finishes first waits for its
        # predecessors so all ranks issue the same sequence of collectives.
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        if group_size(bucket.group) > 1:
            bucket.work = dist.all_reduce(
                bucket.buffer, op=dist.ReduceOp.SUM, group=bucket.group, async_op=True
            )

    def finish_grad_sync(self) -> None:
        """Launch buckets whose parameters got no gradient this step (unused in forward), then wait."""
        for bucket in self.buckets[self._next_launch :]:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
        self._reset()

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()


def torch_adamw(params: list[nn.Parameter], adamw: AdamWConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW with weight decay on matrices only."""
    groups = [
        {"params": [p for p in params if decays(p)], "weight_decay": adamw.weight_decay},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=adamw.lr, betas=adamw.betas, eps=adamw.eps)


def _init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create the state AdamW would create lazily at its first step (the same tensors: a CPU step counter
    in torch's scalar dtype, zero moments shaped like the parameter), so the bytes it holds exist, and can
    be counted, from the start: on the meta device too."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=scalar),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


class DataParallelAdamW:
    """Whole gradients summed over `group` in buckets (`DataParallel`), whole parameters, torch's AdamW.

    tp_group, pp_group, ep_group: the groups over which the canonical gradient norm sums (tensor shards,
    pipeline stages, experts); embed_group and `tied`: the embedding and head tied across the pipeline's
    ends, whose gradients are summed over that group. `dtypes` (parallel.mixed_precision): with 16-bit
    parameters, torch's AdamW steps fp32 master copies, whose `.grad` is the fp32 bucket slice (or, with
    16-bit gradients, an fp32 copy of the 16-bit one made for the step)."""

    def __init__(
        self,
        modules: nn.Module,
        group: dist.ProcessGroup,
        bucket_mb: float,
        adamw: AdamWConfig,
        *,
        expert_group=None,
        tp_group=None,
        pp_group=None,
        ep_group=None,
        embed_group=None,
        tied: tuple[nn.Parameter, ...] = (),
        dtypes: DtypePolicy = AS_BUILT,
    ):
        self.params = [p for p in modules.parameters() if p.requires_grad]
        self.frozen = [p for p in modules.parameters() if not p.requires_grad]  # held, never reduced
        master_dtype = self.params[0].dtype if self.params else torch.float32
        self.masters = master_copies(self.params) if dtypes.mixed(master_dtype) else self.params
        if self.masters is not self.params:
            to_compute_(self.params, dtypes.compute(master_dtype))
        grad_dtype = dtypes.grads(master_dtype) if self.masters is not self.params else None
        self.buckets = DataParallel(modules, group, bucket_mb, expert_group, grad_dtype)
        # Where the reduced gradients live, for the partial and tied sums, the norm and clipping: on the
        # masters when the buckets are fp32 and the parameters 16-bit, else on the parameters.
        for p, m in zip(self.params, self.masters, strict=True):
            if p in self.buckets.main_grads:
                m.grad = self.buckets.main_grads[p]
        on_masters = bool(self.buckets.main_grads)
        self.holders = self.masters if on_masters else self.params
        self._holder = dict(zip(self.params, self.holders, strict=True))
        self.optimizer = torch_adamw(self.masters, adamw)
        _init_adamw_state(self.optimizer)
        self.tp_group, self.pp_group, self.ep_group = tp_group, pp_group, ep_group
        self.embed_group, self.tied = embed_group, tied

    @property
    def mixed(self) -> bool:
        return self.masters is not self.params

    def before_backward(self, is_last: bool) -> None:
        self.buckets.before_backward(is_last)

    def finish_grad_sync(self) -> None:
        self.buckets.finish_grad_sync()
        sum_partial_grads(self.holders, self.tp_group)  # norm gains under SP, replicated k/v heads
        for p in self.tied:  # g_embed = g_head = their sum, over the two ends of the pipeline
            grad = self._holder[p].grad
            if grad is not None:
                dist.all_reduce(grad, group=self.embed_group)

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        grads = [p.grad for p in self.holders if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device) if torch.is_tensor(factor) else factor)

    def grad_norm(self) -> torch.Tensor:
        return global_grad_norm(
            self.holders, tp_group=self.tp_group, pp_group=self.pp_group, ep_group=self.ep_group
        )

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        widened = self.mixed and self.holders is self.params  # 16-bit gradients: fp32 copies for AdamW
        if widened:
            for p, m in zip(self.params, self.masters, strict=True):
                m.grad = p.grad.to(m.dtype) if p.grad is not None else None
        self.optimizer.step()
        if self.mixed:
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)  # the 16-bit parameters are the updated masters, rounded to nearest
                if widened:
                    m.grad = None

    def zero_grad(self) -> None:
        self.buckets.zero_grad()

    def state_dict(self) -> OptimizerState:
        return {p: self.optimizer.state[m] for p, m in zip(self.params, self.masters, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: OptimizerState) -> None:
        """`state[p]["master"]` (the checkpoint's fp32 weights) restores a master; without it the master
        is the loaded parameter."""
        for p, m in zip(self.params, self.masters, strict=True):
            if p not in state:
                continue
            value = dict(state[p])
            master = value.pop("master", None)
            if self.mixed:
                m.copy_(master if master is not None else p)
            self.optimizer.state[m] = value

    def master_weights(self) -> dict[nn.Parameter, torch.Tensor]:
        """The fp32 weights the 16-bit parameters are rounded from; empty when the parameters are the
        masters."""
        return dict(zip(self.params, self.masters, strict=True)) if self.mixed else {}

    def params_whole(self):
        return contextlib.nullcontext()

    def held_bytes(self) -> Held:
        out = no_bytes()
        states = [v for s in self.optimizer.state.values() for v in s.values() if v.dim() > 0]
        masters = sum(nbytes(m) for m in self.masters) if self.mixed else 0
        out["device"].update(
            params=sum(nbytes(p) for p in self.params + self.frozen),
            grads=sum(nbytes(b.buffer) for b in self.buckets.buckets),
            optimizer=sum(nbytes(v) for v in states) + masters,
        )
        return out

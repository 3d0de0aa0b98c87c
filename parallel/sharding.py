"""Sharding facts carried by every parameter, and the global gradient norm that reads them.

A parameter is either replicated or one shard of a larger canonical tensor. The facts live on the tensor
(`param.sharding`) so initialisation, clipping, checkpoints and sanity checks read them instead of
guessing from names or shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.precision import wide


@dataclass(frozen=True)
class Sharding:
    """How this rank's tensor relates to the canonical (full, single-process) parameter.

    full_shape:   the canonical shape (before any split or padding).
    split_dim:    dim of the canonical tensor split into `num_shards` equal chunks over `group`
                  (None: this rank holds the whole tensor, replicated over the tensor group).
    shard_index:  which chunk this rank holds.
    padded_size:  split_dim is zero-padded to this size before chunking (vocabulary padded to a
                  multiple of tp); the padding is dropped again when shards are assembled.
    group:        grid axis the split runs over ("tp" for tensor-parallel layers).
    partial_grad: replicated over the tensor group, but each rank computes only part of its gradient
                  (norm gains under sequence parallelism, key/value weights replicated for GQA), so the
                  gradient must be summed over the tensor group before the step.
    expert:       the parameter of one expert: held by one rank of the expert-parallel group, so its
                  gradient is reduced over the expert-data-parallel group and counted once per expert.
    duplicate_of: the canonical name of a parameter this tensor copies, held and counted by another
                  pipeline stage (the output head tied to the input embedding): kept equal by summing
                  gradients, left out of norms and checkpoints, restored from that name.
    """

    full_shape: tuple[int, ...]
    split_dim: int | None = None
    num_shards: int = 1
    shard_index: int = 0
    padded_size: int | None = None
    group: str = "tp"
    partial_grad: bool = False
    expert: bool = False
    duplicate_of: str | None = None

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the canonical tensor (or of a tensor shaped like it: optimizer moments)."""
        if self.split_dim is None:
            return full
        if self.padded_size is not None and self.padded_size > full.shape[self.split_dim]:
            pad = list(full.shape)
            pad[self.split_dim] = self.padded_size - full.shape[self.split_dim]
            full = torch.cat([full, full.new_zeros(pad)], dim=self.split_dim)
        return full.chunk(self.num_shards, dim=self.split_dim)[self.shard_index]

    def local_range(self) -> tuple[int, int, int]:
        """(start, stop, zero rows after) of this rank's slice along split_dim in canonical coordinates,
        so a reader can fetch only those rows of a stored full tensor (the last shard of a padded
        vocabulary ends in zero rows the canonical tensor does not have)."""
        size = self.full_shape[self.split_dim]
        per = (self.padded_size or size) // self.num_shards
        start = self.shard_index * per
        stop = min(start + per, size)
        return min(start, size), stop, per - max(0, stop - start)

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The canonical tensor from every rank's shard, in group-rank order (inverse of `take`)."""
        if self.split_dim is None:
            return shards[0]
        full = torch.cat(shards, dim=self.split_dim)
        return full.narrow(self.split_dim, 0, self.full_shape[self.split_dim])


def gather_full(tensor: torch.Tensor, sharding: Sharding, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather a sharded tensor over its group and assemble the canonical one (collective)."""
    if sharding.split_dim is None:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(sharding.num_shards)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return sharding.assemble(shards)


def sum_partial_grads(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """grad <- sum over the tensor group, for parameters marked `partial_grad` (one flat all-reduce)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and sharding_of(p).partial_grad]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def counted_on_tp_rank(s: Sharding, tp_rank: int) -> bool:
    """Whether this tensor rank counts the parameter in the gradient norm: tensor-split elements on every
    tensor rank, tensor-replicated ones (experts included: split over ep, not tp) on rank 0 only, copies
    held and counted by another pipeline stage nowhere."""
    split_over_tp = s.split_dim is not None and s.group == "tp"
    return not s.duplicate_of and (split_over_tp or tp_rank == 0)


def sharding_of(param: torch.Tensor) -> Sharding:
    found = getattr(param, "sharding", None)
    return found if found is not None else Sharding(full_shape=tuple(param.shape))


def set_sharding(param: torch.nn.Parameter, sharding: Sharding) -> torch.nn.Parameter:
    param.sharding = sharding
    return param


def _sum_over(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def global_grad_norm(
    params: Iterable[torch.nn.Parameter],
    *,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """L2 norm of the gradient of the whole (canonical) model, identical on every rank.

    ||g||^2 = sum over distinct canonical elements. A tensor-split parameter contributes its shard on
    every tensor rank (all-reduce SUM over tp); a tensor-replicated one (experts included: they are split
    over ep, not tp) only on tensor rank 0, so it is counted once. Pipeline stages hold disjoint
    parameters (all-reduce SUM over pp). Experts are disjoint over the expert group (SUM over ep); dense
    gradients are identical there and are not summed again.
    Gradients must already be reduced over the data-parallel group.
    """
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    dense, expert = [], []
    for p in params:
        if p.grad is None:
            continue
        s = sharding_of(p)
        if not counted_on_tp_rank(s, tp_rank):
            continue
        (expert if s.expert else dense).append(p.grad)
    needs_reduce = any(g is not None and dist.get_world_size(g) > 1 for g in (tp_group, pp_group, ep_group))
    if not needs_reduce:
        # Same arithmetic as torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms.
        norms = torch._foreach_norm(dense + expert, 2.0) if dense or expert else [torch.zeros(())]
        return torch.linalg.vector_norm(torch.stack([wide(n) for n in norms]), 2.0)

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros(())
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack([wide(n) for n in norms]), 2.0) ** 2

    device = (dense + expert)[0].device if dense or expert else torch.device("cpu")
    total = sq(dense).to(device) + _sum_over(sq(expert).to(device), ep_group)
    total = _sum_over(_sum_over(total, tp_group), pp_group)
    return total.sqrt()


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor | None:
    """min(1, max_norm / (norm + 1e-6)), exactly as torch.nn.utils.clip_grad_norm_; None when off."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0) if max_norm > 0 else None


def clip_grads_(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    coef = clip_coefficient(max_norm, total_norm)
    if coef is not None and grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))

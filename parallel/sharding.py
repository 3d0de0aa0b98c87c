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


@dataclass(frozen=True)
class Sharding:
    """How this rank's tensor relates to the canonical (full, single-process) parameter.

    split_dim:   dim of the canonical tensor split into `num_shards` equal chunks over `group`
                 (None: this rank holds the whole tensor, replicated over the tensor group).
    shard_index: which chunk this rank holds.
    group:       grid axis the split runs over ("tp" for tensor-parallel layers).
    expert:      the parameter of one expert: held by one rank of the expert-parallel group, so its
                 gradient is reduced over the expert-data-parallel group and counted once per expert.
    full_shape:  the canonical shape (before any split or padding).
    """

    full_shape: tuple[int, ...]
    split_dim: int | None = None
    num_shards: int = 1
    shard_index: int = 0
    group: str = "tp"
    expert: bool = False

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the canonical tensor."""
        if self.split_dim is None:
            return full
        return full.chunk(self.num_shards, dim=self.split_dim)[self.shard_index]


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
    every tensor rank (all-reduce SUM over tp); a tensor-replicated one only on tensor rank 0, so it is
    counted once. Pipeline stages hold disjoint parameters (all-reduce SUM over pp). Experts are disjoint
    over the expert group (SUM over ep); dense gradients are identical there and are not summed again.
    Gradients must already be reduced over the data-parallel group.
    """
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    dense, expert = [], []
    for p in params:
        if p.grad is None:
            continue
        s = sharding_of(p)
        if s.split_dim is None and s.group == "tp" and tp_rank != 0:
            continue
        (expert if s.expert else dense).append(p.grad)
    needs_reduce = any(g is not None and dist.get_world_size(g) > 1 for g in (tp_group, pp_group, ep_group))
    if not needs_reduce:
        # Same arithmetic as torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms.
        norms = torch._foreach_norm(dense + expert, 2.0) if dense or expert else [torch.zeros(())]
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0) ** 2

    device = (dense + expert)[0].device if dense or expert else torch.device("cpu")
    total = sq(dense).to(device) + _sum_over(sq(expert).to(device), ep_group)
    total = _sum_over(_sum_over(total, tp_group), pp_group)
    return total.sqrt()


def clip_grads_(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)), exactly as torch.nn.utils.clip_grad_norm_."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm <= 0 or not grads:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))

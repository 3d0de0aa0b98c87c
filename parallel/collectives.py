"""Autograd-aware collectives over a tensor-parallel group (Megatron's mappings).

Each is a pair of conjugate operations: what forward does to activations, backward does the adjoint to
gradients. With n ranks in the group, x_r this rank's tensor and [.]_r this rank's chunk:

  copy_to_tp          fwd  y = x                      bwd  dx = sum_r dy_r          (all-reduce)
  reduce_from_tp      fwd  y = sum_r x_r (all-reduce)  bwd  dx = dy
  scatter_to_tp       fwd  y = [x]_r on the last dim   bwd  dx = cat_r dy_r          (all-gather)
  gather_from_tp      fwd  y = cat_r x_r on last dim   bwd  dx = [dy]_r
  gather_from_sp      fwd  y = cat_r x_r on dim 1      bwd  dx = [sum_r dy_r]_r      (reduce-scatter)
  reduce_scatter_to_sp fwd y = [sum_r x_r]_r on dim 1  bwd  dx = cat_r dy_r          (all-gather)
  scatter_to_sp       fwd  y = [x]_r on dim 1          bwd  dx = cat_r dy_r          (all-gather)
  gather_to_replica   fwd  y = cat_r x_r on dim 1      bwd  dx = [dy]_r

"copy" enters a tensor-parallel region whose input is replicated: every rank consumes the same x, so its
true gradient is the sum of the per-rank partial gradients. "reduce" leaves a region whose ranks each
hold a partial sum (the output of a row-parallel matmul). The sequence-parallel pair replaces that
all-reduce by a reduce-scatter along the sequence (dim 1 of (batch, seq, hidden)) on the way out and an
all-gather on the way in: the same bytes as one all-reduce, with activations outside the region sharded.
The last pair moves a replicated activation onto sequence chunks and back when what runs in between
is not a tensor-parallel region but independent per-chunk work (MoE routing splits tokens over the
tensor group): the gradient arriving at the replica is already whole on every rank, so backward just
takes this rank's chunk instead of reduce-scattering. A group of size 1 makes every one of them the
identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import exchange

# Flat all-gather into one tensor and reduce-scatter out of one: torch 2.13 named them all_gather_single and
# reduce_scatter_single and deprecated all_gather_into_tensor / reduce_scatter_tensor, the names earlier
# releases have. Both dispatch the same c10d operators (_allgather_base_, _reduce_scatter_base_), so the
# communication ledger counts them alike whichever this torch offers.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _exchanged(group) -> bool:
    """Gloo's all-gather and reduce-scatter are slower than a point-to-point exchange of the same bytes
    (parallel.exchange); NCCL's are the direct ones."""
    return dist.get_backend(group) == "gloo" and dist.get_world_size(group) > 1


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """output = cat_r input_r over `group` (all_gather_single; input may be this rank's chunk of output)."""
    if _exchanged(group):
        return exchange.all_gather(output, input, group, async_op)
    return all_gather_single(output, input, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """output = this rank's 1/n of sum_r input_r over `group` (reduce_scatter_single; output may be this
    rank's chunk of input)."""
    if _exchanged(group):
        return exchange.reduce_scatter(output, input, group, async_op)
    return reduce_scatter_single(output, input, group=group, async_op=async_op)


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    # all_gather_into_tensor concatenates on dim 0; move `dim` there and back.
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_flat(out, moved, group=group)
    # One contiguous copy here, not one per consumer: under SP the gathered input feeds q, k and v (or
    # gate and up), and each linear layer would otherwise copy (and keep for backward) its own.
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % n:
        raise ValueError(f"dim {dim} of size {moved.shape[0]} is not divisible by the group size {n}")
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_flat(out, moved, group=group)
    return out.movedim(0, dim)


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _mapping(forward, backward, name: str):
    """An autograd function y = forward(x) whose gradient is dx = backward(dy), both over `group`."""

    class Mapping(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, dy):
            return backward(dy, ctx.group), None

    Mapping.__name__ = Mapping.__qualname__ = name

    def apply(x: torch.Tensor, group) -> torch.Tensor:
        return Mapping.apply(x, group)

    apply.__name__ = name
    return apply


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


# The conjugate pairs of the table above.
copy_to_tp = _mapping(_identity, _all_reduce, "copy_to_tp")
reduce_from_tp = _mapping(_all_reduce, _identity, "reduce_from_tp")
scatter_to_tp = _mapping(lambda x, g: _chunk(x, -1, g), lambda dy, g: _all_gather(dy, -1, g), "scatter_to_tp")
gather_from_tp = _mapping(
    lambda x, g: _all_gather(x, -1, g), lambda dy, g: _chunk(dy, -1, g), "gather_from_tp"
)
gather_from_sp = _mapping(
    lambda x, g: _all_gather(x, 1, g), lambda dy, g: _reduce_scatter(dy, 1, g), "gather_from_sp"
)
reduce_scatter_to_sp = _mapping(
    lambda x, g: _reduce_scatter(x, 1, g), lambda dy, g: _all_gather(dy, 1, g), "reduce_scatter_to_sp"
)
scatter_to_sp = _mapping(lambda x, g: _chunk(x, 1, g), lambda dy, g: _all_gather(dy, 1, g), "scatter_to_sp")
gather_to_replica = _mapping(
    lambda x, g: _all_gather(x, 1, g), lambda dy, g: _chunk(dy, 1, g), "gather_to_replica"
)

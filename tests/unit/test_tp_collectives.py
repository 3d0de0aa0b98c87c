"""The autograd collectives of parallel/collectives.py in real Gloo worlds: forward values, backward as the
adjoint, on integer-valued tensors so every sum is exact and comparisons are bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.collectives import (
    all_gather_flat,
    all_gather_single,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_flat,
    reduce_scatter_single,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
)
from parallel.ledger import ALL_GATHER, REDUCE_SCATTER, CommLedger, ring_bytes
from tests import harness
from tests.tp_helpers import randint, same_on_every_rank, setup


def _run(fn, x: torch.Tensor, dy: torch.Tensor, group):
    """fn(x) forward and backward with cotangent dy; x may be non-contiguous."""
    leaf = x.detach().requires_grad_()
    y = fn(leaf, group)
    y.backward(dy)
    assert y.dtype == x.dtype and leaf.grad.dtype == x.dtype
    return y.detach(), leaf.grad


def _noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values with transposed strides, so the collectives must handle the layout."""
    return x.transpose(0, -1).contiguous().transpose(0, -1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum()


def _sum_over(value: torch.Tensor, group) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value, group=group)
    return value


def collectives_case(tp: int, dp: int, dtype: torch.dtype) -> None:
    """Forward values and backward of every collective against a direct computation, plus the adjoint
    identity sum_r <f(x)_r, dy_r> = sum_r <x_r, dx_r> in the space each function lives in: a
    replicated tensor (the input of copy/scatter, the output of reduce/gather_from_tp) is one vector,
    counted once, not once per rank. Integer-valued data: every sum is exact, so all is bitwise."""
    group, r, n, seed = setup(tp, dp, 1)
    B, S, H = 2, 2 * n, 3 * n

    def distinct(k, *shape):  # one tensor per rank; every rank can build all of them
        return [_noncontiguous(randint(seed + 100 * k + s, *shape, dtype=dtype)) for s in range(n)]

    def once(value):  # an inner product of replicated tensors: equal on every rank, counted once
        assert same_on_every_rank(value, group)
        return value

    full = _noncontiguous(randint(seed, B, S, H, dtype=dtype))  # replicated over the group
    full_dy = randint(seed + 1, B, S, H, dtype=dtype)  # replicated cotangent

    # copy_to_tp: y = x (replicated in), dx = sum_r dy_r.
    dys = distinct(1, B, S, H)
    y, dx = _run(copy_to_tp, full, dys[r], group)
    assert torch.equal(y, full) and torch.equal(dx, sum(dys))
    assert once(_dot(full, dx)) == sum(_dot(full, d) for d in dys)

    # reduce_from_tp: y = sum_r x_r (replicated out), dx = dy.
    xs = distinct(2, B, S, H)
    y, dx = _run(reduce_from_tp, xs[r], full_dy, group)
    assert torch.equal(y, sum(xs)) and torch.equal(dx, full_dy)
    assert _sum_over(_dot(xs[r], dx), group) == once(_dot(y, full_dy))

    # scatter_to_tp: y = [x]_r on the last dim (replicated in), dx = cat_r dy_r.
    dys = distinct(3, B, S, H // n)
    y, dx = _run(scatter_to_tp, full, dys[r], group)
    assert torch.equal(y, full.chunk(n, -1)[r]) and torch.equal(dx, torch.cat(dys, -1))
    assert once(_dot(full, dx)) == sum(_dot(full.chunk(n, -1)[s], dys[s]) for s in range(n))

    # gather_from_tp: y = cat_r x_r on the last dim (replicated out), dx = [dy]_r.
    xs = distinct(4, B, S, H // n)
    y, dx = _run(gather_from_tp, xs[r], full_dy, group)
    assert torch.equal(y, torch.cat(xs, -1)) and torch.equal(dx, full_dy.chunk(n, -1)[r])
    assert _sum_over(_dot(xs[r], dx), group) == once(_dot(y, full_dy))

    # gather_from_sp: y = cat_r x_r on dim 1, consumed differently by each rank: dx = [sum_r dy_r]_r.
    xs, dys = distinct(5, B, S // n, H), distinct(6, B, S, H)
    y, dx = _run(gather_from_sp, xs[r], dys[r], group)
    assert torch.equal(y, torch.cat(xs, 1)) and torch.equal(dx, sum(dys).chunk(n, 1)[r])
    assert _sum_over(_dot(xs[r], dx), group) == _sum_over(_dot(y, dys[r]), group)

    # reduce_scatter_to_sp: y = [sum_r x_r]_r on dim 1, dx = cat_r dy_r.
    xs, dys = distinct(7, B, S, H), distinct(8, B, S // n, H)
    y, dx = _run(reduce_scatter_to_sp, xs[r], dys[r], group)
    assert torch.equal(y, sum(xs).chunk(n, 1)[r]) and torch.equal(dx, torch.cat(dys, 1))
    assert _sum_over(_dot(xs[r], dx), group) == _sum_over(_dot(y, dys[r]), group)

    # scatter_to_sp: y = [x]_r on dim 1 (replicated in), dx = cat_r dy_r.
    dys = distinct(9, B, S // n, H)
    y, dx = _run(scatter_to_sp, full, dys[r], group)
    assert torch.equal(y, full.chunk(n, 1)[r]) and torch.equal(dx, torch.cat(dys, 1))
    assert once(_dot(full, dx)) == sum(_dot(full.chunk(n, 1)[s], dys[s]) for s in range(n))

    # A split that does not divide is refused (on every rank, before any communication).
    odd = torch.zeros(B, S + 1, H + 1, dtype=dtype)
    for fn in (scatter_to_tp, scatter_to_sp, reduce_scatter_to_sp):
        with pytest.raises(ValueError, match="not divisible"):
            fn(odd, group)


def flat_exchange_case(tp: int, dp: int) -> dict:
    """reduce_scatter_flat and all_gather_flat (on Gloo, parallel.exchange's point-to-point exchanges)
    against torch's flat collectives they stand for, synchronous and asynchronous, into a new tensor and
    in place (ZeRO-1's gradient shard is a chunk of its input, every parameter shard a chunk of the
    gathered output): bit for bit. The ledger counts each as one call of its collective."""
    group, r, n, seed = setup(tp, dp, 1)
    xs = [randint(seed + s, 6 * n) for s in range(n)]
    expected = sum(xs).chunk(n)[r]
    out, flat = torch.full((6,), float("nan")), torch.full((6,), float("nan"))
    with CommLedger() as ledger:
        reduce_scatter_flat(out, xs[r], group=group, async_op=True).wait()
    reduce_scatter_single(flat, xs[r], group=group)
    assert torch.equal(out, expected) and torch.equal(flat, expected)
    reduce_scatter_flat(out.zero_(), xs[r], group=group)
    assert torch.equal(out, expected)
    in_place = xs[r].clone()
    reduce_scatter_flat(in_place.chunk(n)[r], in_place, group=group)
    assert torch.equal(in_place.chunk(n)[r], expected)

    whole = torch.cat([x.chunk(n)[s] for s, x in enumerate(xs)])
    gathered, reference = torch.full((6 * n,), float("nan")), torch.full((6 * n,), float("nan"))
    with ledger:
        all_gather_flat(gathered, xs[r].chunk(n)[r], group=group)
    all_gather_single(reference, xs[r].chunk(n)[r].contiguous(), group=group)
    assert torch.equal(gathered, whole) and torch.equal(reference, whole)
    in_place = torch.full((6 * n,), float("nan"))
    in_place.chunk(n)[r].copy_(xs[r].chunk(n)[r])
    all_gather_flat(in_place, in_place.chunk(n)[r], group=group, async_op=True).wait()
    assert torch.equal(in_place, whole)
    return {op: (t.calls, t.sent) for (_, op), t in ledger.tallies().items()}


def test_flat_exchanges_equal_torch_collectives(tp_layout):
    world, tp, dp = tp_layout
    for tallies in world.run(flat_exchange_case, tp, dp):
        assert tallies == {
            REDUCE_SCATTER: (1, ring_bytes(REDUCE_SCATTER, 6 * tp * 4, tp)),
            ALL_GATHER: (1, ring_bytes(ALL_GATHER, 6 * tp * 4, tp)),
        }


COLLECTIVES = (
    copy_to_tp,
    reduce_from_tp,
    scatter_to_tp,
    gather_from_tp,
    gather_from_sp,
    reduce_scatter_to_sp,
    scatter_to_sp,
)


def identity_case() -> None:
    """A tensor group of one rank: every collective is the identity, forward and backward."""
    grid = harness.grid(tp=1, dp=dist.get_world_size())
    x, dy = randint(1, 2, 4, 3), randint(2, 2, 4, 3)
    for fn in COLLECTIVES:
        y, dx = _run(fn, x, dy, grid.tp_group)
        assert torch.equal(y, x) and torch.equal(dx, dy), fn.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_collectives(tp_layout, dtype):
    world, tp, dp = tp_layout
    world.run(collectives_case, tp, dp, dtype)


def test_collectives_are_identity_on_one_rank(world2):
    world2.run(identity_case)

"""Ring attention (parallel/context_parallel.py) in real Gloo worlds against torch's own causal
scaled_dot_product_attention on the whole sequence: outputs elementwise and the gradients of q, k and v
per tensor, in float64 to FP64, with grouped-query attention; and the load-balanced split of the sequence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.context_parallel import local_positions, ring_attention, split_microbatch
from tests import harness
from tests.tolerances import FP64


def ring_case(cp: int, heads: int, kv_heads: int, seq: int, documents: bool = False) -> None:
    grid = harness.grid(cp=cp, dp=dist.get_world_size() // cp)
    r = grid.rank_in("cp")
    gen = torch.Generator().manual_seed(7)  # the same full tensors on every rank
    b, d = 2, 8
    q = torch.randn(b, heads, seq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, kv_heads, seq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, kv_heads, seq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, heads, seq, d, generator=gen, dtype=torch.float64)
    # Packed documents: rows cut at random places (a document may span chunks and ranks).
    starts = torch.rand(b, seq, generator=gen) < 0.3
    doc_ids = starts.long().cumsum(1) if documents else None
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1) if documents else None
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=not documents, enable_gqa=heads != kv_heads
    )
    ref.backward(dout)

    index = local_positions(seq, cp, r)
    local = [t.detach()[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, grid.cp_group, doc_ids[:, index] if documents else None)
    out.backward(dout[:, :, index])
    torch.testing.assert_close(out, ref.detach()[:, :, index], **FP64)
    # Gradients per tensor in the 2-norm (tests/tolerances.py): an element that is exactly zero in one
    # (the first query sees only itself) is a few ulps in the other.
    for name, mine, full in zip("qkv", local, (q, k, v), strict=True):
        expected = full.grad[:, :, index]
        err = float((mine.grad - expected).norm() / expected.norm())
        assert err <= FP64["rtol"], f"d{name}: relative 2-norm difference {err:.1e}"


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_ring_attention_two_ranks(world2, heads, kv_heads):
    world2.run(ring_case, 2, heads, kv_heads, 8)


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_four_ranks(world4, cp):
    world4.run(ring_case, cp, 4, 2, 16)


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_with_document_masks(world4, cp):
    world4.run(ring_case, cp, 4, 2, 16, True)


def test_load_balanced_chunks():
    # 2n chunks; rank r holds r and 2n-1-r, so the ranks together hold every position once.
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([local_positions(16, 4, r) for r in range(4)])
    assert sorted(held.tolist()) == list(range(16))
    inputs, targets = torch.arange(16).view(2, 8), torch.arange(16).view(2, 8) + 100
    x, y, context = split_microbatch((inputs, targets), 2, 1)
    assert x.tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]] and y.tolist() == (x + 100).tolist()
    assert context["positions"].tolist() == [[2, 3, 4, 5]] * 2


def test_sequence_not_a_multiple_of_twice_cp_is_refused():
    with pytest.raises(ValueError, match=r"train.seq_len=12 must be divisible by 2\*parallel.cp=8"):
        local_positions(12, 4, 0)


def routing_case(cp: int, tp: int) -> None:
    """Expert routing of a rank's chunks (cut again over tp) keeps exactly the slots that routing the
    whole micro-batch on one rank keeps: same capacity, same priority, same drops."""
    from parallel.context_parallel import token_segments
    from parallel.moe import MoELayer, expert_capacity, route

    grid = harness.grid(cp=cp, tp=tp, dp=dist.get_world_size() // (cp * tp))
    b, seq, experts, k = 3, 16, 4, 2
    logits = torch.randn(seq, b, experts, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    capacity = expert_capacity(1.0, b * seq, k, experts)  # tight: slots are dropped
    whole = route(logits.reshape(seq * b, experts), k, capacity, b * seq)
    assert not whole.keep.all()

    runs = token_segments(seq, cp, grid.rank_in("cp"), tp, grid.rank_in("tp"))
    mine = torch.cat([torch.arange(start, start + length) for start, length in runs])
    layer = MoELayer(8, 8, experts, k, 1.0, 0.0, 0.0, tp_group=grid.tp_group, cp_group=grid.cp_group)
    context = layer._context_routing(b, len(mine), torch.device("cpu"))
    r = route(logits[mine].reshape(-1, experts), k, capacity, b * seq, grid.tp_group, context)
    assert torch.equal(r.keep, whole.keep.view(seq, b, k)[mine].reshape(-1, k))


@pytest.mark.parametrize("cp,tp", [(2, 1), (2, 2), (4, 1)])
def test_expert_routing_over_context_chunks(world4, cp, tp):
    world4.run(routing_case, cp, tp)

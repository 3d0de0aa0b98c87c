"""Mixture-of-experts pieces of parallel/ on their own: routing against a token-by-token loop reference,
the layer's output and router gradient against a direct computation, dispatch/combine over real
all-to-alls, and routing split over tensor ranks equal to routing the whole micro-batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from parallel.expert_parallel import run_experts
from parallel.moe import MoELayer, expert_capacity, route
from tests import harness
from tests.tolerances import FP64


def loop_route(logits: torch.Tensor, k: int, capacity: int) -> dict:
    """Routing written out token by token: first choices before second, each in sequence order."""
    tokens, experts = logits.shape
    probs = torch.softmax(logits, -1)
    choice = [sorted(range(experts), key=lambda e: -float(probs[t, e]))[:k] for t in range(tokens)]
    filled = [0] * experts
    keep = torch.zeros(tokens, k, dtype=torch.bool)
    routed = [0] * experts
    for j in range(k):
        for t in range(tokens):
            e = choice[t][j]
            routed[e] += 1
            keep[t, j] = filled[e] < capacity
            filled[e] += 1
    weight = torch.stack([probs[t, choice[t]] / probs[t, choice[t]].sum() for t in range(tokens)])
    share = torch.tensor(routed, dtype=logits.dtype) / (tokens * k)
    aux = experts * sum(share[e] * probs[:, e].mean() for e in range(experts))
    z = torch.stack([torch.logsumexp(logits[t], 0) ** 2 for t in range(tokens)]).mean()
    return {"expert": torch.tensor(choice), "keep": keep, "weight": weight, "aux": aux, "z": z}


@pytest.mark.parametrize("k", [1, 2])
def test_routing_matches_a_token_by_token_reference(k):
    logits = torch.randn(24, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    capacity = expert_capacity(0.75, 24, k, 4)
    assert capacity == math.floor(0.75 * 24 * k / 4)
    r, ref = route(logits, k, capacity, total_tokens=24), loop_route(logits, k, capacity)
    assert torch.equal(r.expert, ref["expert"])
    assert torch.equal(r.keep, ref["keep"]) and not r.keep.all()  # this capacity drops slots
    torch.testing.assert_close(r.weight, ref["weight"], **FP64)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(24, dtype=torch.float64), **FP64)
    torch.testing.assert_close(r.aux_loss, ref["aux"], **FP64)
    torch.testing.assert_close(r.z_loss, ref["z"], **FP64)
    assert int(r.counts.sum()) == 24 * k


def test_moe_layer_output_and_aux_gradient():
    """The layer computes sum over kept choices of w * SwiGLU_e(x) (zero for a token whose choices were
    all dropped), and its backward adds d(scale * (a * aux + z_coef * z)) to the router gradient."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, 0.5, aux_loss_coef=0.3, z_loss_coef=0.2).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer.aux_grad_scale = 0.7
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    out = layer(x)
    tokens = x.transpose(0, 1).reshape(12, 8)  # the layer's sequence-major token order
    logits = tokens @ layer.router.weight.T
    r = route(logits, 2, expert_capacity(0.5, 12, 2, 4), 12)
    ex = layer.experts
    expected = torch.zeros_like(tokens)
    for t in range(12):
        for j in range(2):
            if r.keep[t, j]:
                e = int(r.expert[t, j])
                h = torch.nn.functional.silu(ex.w1[e] @ tokens[t]) * (ex.w3[e] @ tokens[t])
                expected[t] += r.weight[t, j] * (ex.w2[e] @ h)
    expected = expected.view(6, 2, 8).transpose(0, 1)
    torch.testing.assert_close(out, expected, **FP64)
    assert (~r.keep).all(-1).any(), "the capacity should drop every choice of some token"
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ours = layer.router.weight.grad.clone()
    layer.zero_grad()
    objective = (expected * g).sum() + 0.7 * (0.3 * r.aux_loss + 0.2 * r.z_loss)
    objective.backward()
    torch.testing.assert_close(ours, layer.router.weight.grad, **FP64)


def dispatch_case(ep: int) -> dict:
    """Rows with random experts (rank 3 sends nothing, expert 5 gets nothing) through the all-to-alls:
    identity experts give the rows back exactly, scaling experts (row * (e + 1)) prove each row met
    its own expert, and the backward returns (e + 1) * the output gradient."""
    grid = harness.grid(dp=dist.get_world_size(), ep=ep)
    rank, experts = dist.get_rank(), 8
    gen = torch.Generator().manual_seed(rank)
    n = 0 if rank == 3 else 5 + 3 * rank
    choices = torch.tensor([e for e in range(experts) if e != 5])
    expert = choices[torch.randint(len(choices), (n,), generator=gen)]
    rows = torch.randn(n, 6, dtype=torch.float64, generator=gen).requires_grad_()
    group = grid.ep_group if ep > 1 else None
    first = grid.rank_in("ep") * experts // ep

    def identity(x, counts):
        return x

    def scale(x, counts):
        ids = torch.repeat_interleave(torch.arange(len(counts)) + first + 1, torch.tensor(counts))
        return x * ids.unsqueeze(-1)

    same = run_experts(rows, expert, experts, identity, group)
    scaled = run_experts(rows, expert, experts, scale, group)
    g = torch.randn_like(scaled)
    scaled.backward(g)
    factor = (expert + 1).unsqueeze(-1).to(rows.dtype)
    return {
        "identity": torch.equal(same, rows),
        "scaled": torch.equal(scaled, rows * factor),
        "grad": torch.equal(rows.grad, g * factor),
    }


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_dispatch_then_combine_returns_every_row(world4, ep):
    for result in world4.run(dispatch_case, ep):
        assert result == {"identity": True, "scaled": True, "grad": True}


def tp_routing_case() -> dict:
    """Tokens split over the tensor group route exactly as the whole micro-batch does."""
    tp_group = harness.grid(tp=2).tp_group
    rank = dist.get_rank()
    logits = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    whole = route(logits, 2, 6, 20)
    part = route(logits[rank * 10 : (rank + 1) * 10], 2, 6, 20, tp_group)
    shares = torch.stack([part.aux_loss, part.z_loss])
    dist.all_reduce(shares, group=tp_group)
    return {
        "keep": torch.equal(part.keep, whole.keep[rank * 10 : (rank + 1) * 10]),
        "aux_z": torch.allclose(shares, torch.stack([whole.aux_loss, whole.z_loss]), rtol=1e-12, atol=0),
        "drops": not whole.keep.all(),
    }


def test_routing_split_over_tensor_ranks_matches_the_whole(world2):
    for result in world2.run(tp_routing_case):
        assert result == {"keep": True, "aux_z": True, "drops": True}

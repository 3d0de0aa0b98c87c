"""parallel.split_backward on its own, against torch's single backward of the same graph: a pre-norm
transformer chunk in plain torch (attention, SwiGLU, norms, head and loss) gets bit-identical gradients,
since every node runs its formulas once with the same operands; the input's gradient exists before any
weight's; and graphs that do not split cleanly take one whole backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from parallel.split_backward import backward_input_first

WIDTH, HEADS, VOCAB = 32, 4, 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.gate, self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, HEADS, -1).unbind(2)
        a = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, WIDTH))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LastChunk(nn.Module):
    """The last pipeline chunk of a small language model: blocks, the final norm, the head, the loss."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.norm, self.head = nn.RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, x, targets):
        logits = self.head(self.norm(self.blocks(x)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def chunk_and_input() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    chunk = LastChunk()
    for p in chunk.parameters():
        nn.init.normal_(p, std=0.1)  # norm weights off 1, so their gradients are not special
    return chunk, torch.randn(2, 16, WIDTH), torch.randint(0, VOCAB, (2, 16))


def gradients(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor, split: bool) -> dict:
    chunk.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    loss = chunk(x, targets)
    if split:
        backward_input_first(loss, None, x, chunk.parameters())()
    else:
        loss.backward()
    return {"input": x.grad, **{n: p.grad.clone() for n, p in chunk.named_parameters()}}


def test_split_gradients_equal_a_single_backward_bitwise():
    chunk, x, targets = chunk_and_input()
    whole, split = gradients(chunk, x, targets, False), gradients(chunk, x, targets, True)
    assert whole.keys() == split.keys()
    assert [k for k in whole if not torch.equal(whole[k], split[k])] == []


def test_every_matmul_runs_once():
    chunk, x, targets = chunk_and_input()
    counts = []
    for split in (False, True):
        with profile() as prof:
            gradients(chunk, x, targets, split)
        counts.append(sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm")))
    assert counts[0] == counts[1] > 0


def test_input_gradient_comes_before_any_weight_gradient():
    chunk, x, targets = chunk_and_input()
    expected = gradients(chunk, x, targets, False)
    chunk.zero_grad(set_to_none=True)
    accumulated = []
    for name, p in chunk.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: accumulated.append(name))
    x = x.clone().requires_grad_()
    weight_pass = backward_input_first(chunk(x, targets), None, x, chunk.parameters())
    assert torch.equal(x.grad, expected["input"])
    assert accumulated == [] and all(p.grad is None for p in chunk.parameters())
    weight_pass()
    assert sorted(accumulated) == sorted(n for n, _ in chunk.named_parameters())  # each hook once


class TwiceUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return (x @ self.w @ self.w).sum()


class Scale(torch.autograd.Function):
    """x * w with a Python backward, which computes both gradients in one call."""

    calls = 0

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, dy):
        Scale.calls += 1
        x, w = ctx.saved_tensors
        return dy * w, (dy * x).sum(0)


class ThroughFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return Scale.apply(x, self.w).sum()


def test_unsplittable_graphs_take_one_whole_backward():
    """A weight used twice (its branches meet) or a weight entering a Python autograd Function (whose
    backward would run twice): the weights have their gradients at once, from a single backward."""
    torch.manual_seed(0)
    for module in (TwiceUsed(), ThroughFunction()):
        x = torch.randn(2, 3)
        xr = x.clone().requires_grad_()
        module(xr).backward()
        expected_w, expected_x = module.w.grad.clone(), xr.grad
        module.w.grad = None
        Scale.calls = 0
        xs = x.clone().requires_grad_()
        weight_pass = backward_input_first(module(xs), None, xs, module.parameters())
        assert torch.equal(module.w.grad, expected_w) and torch.equal(xs.grad, expected_x)
        weight_pass()
        assert torch.equal(module.w.grad, expected_w)  # the weight pass added nothing
        assert Scale.calls == (1 if isinstance(module, ThroughFunction) else 0)


def test_an_output_that_does_not_depend_on_the_input_takes_one_whole_backward():
    w = nn.Parameter(torch.randn(3))
    x = torch.randn(3, requires_grad=True)
    weight_pass = backward_input_first((w * w).sum(), None, x, [w])
    assert torch.equal(w.grad, 2 * w.detach()) and x.grad is None
    weight_pass()
    assert torch.equal(w.grad, 2 * w.detach())


def test_a_whole_backward_still_gives_a_non_leaf_input_its_gradient():
    module = TwiceUsed()
    leaf = torch.randn(2, 3, requires_grad=True)
    x = leaf * 1.0  # the input of a stage that is itself computed
    backward_input_first(module(x), None, x, module.parameters())()
    assert x.grad is not None and torch.equal(x.grad, leaf.grad)

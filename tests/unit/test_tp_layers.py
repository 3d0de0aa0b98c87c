"""Tensor-parallel building blocks one at a time, each in a real Gloo world, against the single-process
computation on the same full tensors: the column- and row-parallel linears, the vocabulary-parallel
embedding and cross-entropy, and a tied embedding/head (the collectives: test_tp_collectives.py).

Every rank builds the full tensors from seeded generators (identical on the ranks of one tensor group,
different per data-parallel replica, so a collective over the wrong group cannot pass), takes its shard
with the layer's own `weight.sharding.take`, and compares what the layer produces against F.linear /
F.embedding / F.cross_entropy on the full tensors:

- bitwise (torch.equal) where no arithmetic differs: collectives on integer-valued tensors (every sum
  is exact), embedding lookups (one row plus exact zeros), gathers, and padding that must stay zero;
- relative 2-norm per tensor, ||ours - ref|| <= rtol * ||ref||, where a matmul or a softmax sums in a
  different order (tests/tolerances.py; elementwise with atol=0 would fail on the odd element whose
  terms nearly cancel, which is rounding, not a bug); scalar losses elementwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.collectives import (
    copy_to_tp,
    gather_from_sp,
    scatter_to_tp,
)
from parallel.sharding import gather_full, sharding_of, sum_partial_grads
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
)
from tests.tolerances import FP32, FP64
from tests.tp_helpers import (
    IGNORE,
    close,
    close_scalar,
    gather_cat,
    pad_cols,
    randn,
    same_on_every_rank,
    setup,
    token_ids,
    zero,
)


def column_case(tp: int, dp: int) -> dict:
    """ColumnParallelLinear entered through copy_to_tp: output (gathered by the layer or here), input
    gradient and assembled weight gradient against F.linear on the full weight."""
    group, r, n, seed = setup(tp, dp, 2)
    B, S, D = 2, 3, 8
    errs = {}
    # (out_features, gather_output, pad_output); n + 1 leaves the last of 4 ranks with padding only.
    configs = [(3 * n, False, False), (3 * n, True, False), (3 * n + 1, False, True), (3 * n + 1, True, True)]
    configs += [(n + 1, False, True), (n + 1, True, True)]
    for k, (out, gather, pad) in enumerate(configs):
        s = seed + 10 * k
        padded = -(-out // n) * n
        W, x, dy = randn(s, out, D), randn(s + 1, B, S, D), randn(s + 2, B, S, out)

        layer = ColumnParallelLinear(D, out, group, gather_output=gather, pad_output=pad)
        sharding = layer.weight.sharding
        assert sharding.full_shape == (out, D) and sharding.padded_size == (padded if padded != out else None)
        assert layer.weight.shape == (padded // n, D)
        with torch.no_grad():
            layer.weight.copy_(sharding.take(W))
        assert torch.equal(gather_full(layer.weight.detach(), sharding, group), W)  # take/assemble

        x_in = x.clone().requires_grad_()
        y = layer(copy_to_tp(x_in, group))
        y_full = y if gather else gather_cat(y.detach(), -1, group)
        # A gathered output has the real width (padding columns would count as classes in a loss); a
        # split one keeps the padding, whose columns are exactly zero (padded weight rows are zero).
        assert y_full.shape == (B, S, out if gather else padded)
        assert gather or padded == out or zero(y_full[..., out:])
        if gather:
            (y * dy).sum().backward()
        else:
            (y * pad_cols(dy, padded).chunk(n, -1)[r]).sum().backward()

        x_ref, W_ref = x.clone().requires_grad_(), W.clone().requires_grad_()
        y_ref = F.linear(x_ref, W_ref)
        (y_ref * dy).sum().backward()

        what = f"column out={out} gather={gather} pad={pad}"
        errs[what] = max(
            close(y_full[..., :out].detach(), y_ref.detach(), f"{what}: output"),
            close(x_in.grad, x_ref.grad, f"{what}: input grad"),
            close(gather_full(layer.weight.grad, sharding, group), W_ref.grad, f"{what}: weight grad"),
        )
        if padded != out:
            grads = gather_cat(layer.weight.grad, 0, group)
            assert zero(grads[out:]), f"{what}: padded weight rows got a gradient"

    # Output features that do not divide are refused unless padded.
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(D, 3 * n + 1, group)
    return errs


def row_case(tp: int, dp: int) -> dict:
    """RowParallelLinear on this rank's feature chunk (scatter_to_tp of a replicated input): output
    (this rank's sequence chunk under sequence parallelism), input, weight and bias gradients against
    F.linear with the same full weight and a nonzero bias (added n times it would be off by (n-1)b)."""
    group, r, n, seed = setup(tp, dp, 3)
    B, S, D, O = 2, 2 * n, 3 * n, 5
    errs = {}
    for k, (sp, has_bias) in enumerate([(False, False), (False, True), (True, False), (True, True)]):
        s = seed + 10 * k
        W, b = randn(s, O, D), randn(s + 1, O) + 1.0
        x, dz = randn(s + 2, B, S, D), randn(s + 3, B, S, O)

        layer = RowParallelLinear(D, O, group, sequence_parallel=sp, bias=has_bias)
        assert layer.weight.shape == (O, D // n) and layer.weight.sharding.split_dim == 1
        with torch.no_grad():
            layer.weight.copy_(layer.weight.sharding.take(W))
            if has_bias:
                layer.bias.copy_(b)
        if has_bias:
            # Replicated; its gradient is partial exactly when each rank sees one sequence chunk.
            assert sharding_of(layer.bias).split_dim is None and sharding_of(layer.bias).partial_grad == sp
        else:
            assert layer.bias is None

        x_in = x.clone().requires_grad_()
        z = layer(scatter_to_tp(x_in, group))
        x_ref, W_ref, b_ref = (t.clone().requires_grad_() for t in (x, W, b))
        z_ref = F.linear(x_ref, W_ref, b_ref if has_bias else None)
        (z_ref * dz).sum().backward()
        if sp:
            assert z.shape == (B, S // n, O)
            z_ref, dz = z_ref.chunk(n, 1)[r], dz.chunk(n, 1)[r]
        else:
            # Replicated output: the all-reduce reduces each element once and distributes the result,
            # so the ranks agree to the bit (replicated activations cannot drift apart).
            assert same_on_every_rank(z.detach(), group)
        (z * dz).sum().backward()
        # As the trainer does after backward: partial gradients summed over the group, others left.
        sum_partial_grads(layer.parameters(), group)

        what = f"row sp={sp} bias={has_bias}"
        errs[what] = max(
            close(z.detach(), z_ref.detach(), f"{what}: output"),
            close(x_in.grad, x_ref.grad, f"{what}: input grad"),
            close(
                gather_full(layer.weight.grad, layer.weight.sharding, group), W_ref.grad, f"{what}: W grad"
            ),
            close(layer.bias.grad, b_ref.grad, f"{what}: bias grad") if has_bias else 0.0,
        )
    return errs


def embedding_case(tp: int, dp: int) -> dict:
    """VocabParallelEmbedding against F.embedding on the full table, vocabulary divisible by n, padded,
    and (n + 1 for n = 4) with a last rank holding padding rows only; with and without SP."""
    group, r, n, seed = setup(tp, dp, 4)
    B, S, D = 2, 4 * n, 6
    errs = {}
    for k, (vocab, sp) in enumerate((v, sp) for v in (4 * n, 4 * n - 3, n + 1) for sp in (False, True)):
        s = seed + 10 * k
        padded = -(-vocab // n) * n
        E, ids, dy = randn(s, vocab, D), token_ids(s + 1, vocab, (B, S)), randn(s + 2, B, S, D)

        layer = VocabParallelEmbedding(vocab, D, group, sequence_parallel=sp)
        sharding = layer.weight.sharding
        assert sharding.full_shape == (vocab, D) and layer.weight.shape == (padded // n, D)
        with torch.no_grad():
            layer.weight.copy_(sharding.take(E))
        out = layer(ids)

        E_ref = E.clone().requires_grad_()
        out_ref = F.embedding(ids, E_ref)
        (out_ref * dy).sum().backward()
        if sp:
            assert out.shape == (B, S // n, D)
            out_ref, dy = out_ref.chunk(n, 1)[r], dy.chunk(n, 1)[r]
        # Bitwise: every token is its row on the owning rank plus exact zeros from the others.
        what = f"embedding vocab={vocab} sp={sp}"
        assert torch.equal(out.detach(), out_ref.detach()), f"{what}: output"
        (out * dy).sum().backward()

        grads = gather_cat(layer.weight.grad, 0, group)
        assert padded == vocab or zero(grads[vocab:]), f"{what}: padding rows got a gradient"
        # Bitwise: each row sums the same dy rows in token order (index_add); tokens owned elsewhere
        # add exact zeros to the local row 0, and the SP backward only all-gathers dy.
        assert torch.equal(gather_full(layer.weight.grad, sharding, group), E_ref.grad), f"{what}: grad"
        errs[what] = 0.0
    return errs


def cross_entropy_case(tp: int, dp: int) -> dict:
    """VocabParallelCrossEntropy on logits split by vocabulary (padded with garbage up to a multiple of
    n) against F.cross_entropy(reduction="sum") on the full logits: value, and logits gradient for a
    loss scaled by 0.5 (so grad_output is used); ignored targets and a target in every rank's range."""
    group, r, n, seed = setup(tp, dp, 5)
    B, S = 2, 12
    errs = {}
    cases = [(v, torch.float32, 3) for v in (4 * n, 4 * n - 3, n + 1)]
    cases += [
        (4 * n - 3, torch.float32, B * S),
        (4 * n - 3, torch.float64, 3),
        (4 * n - 3, torch.bfloat16, 3),
    ]
    for k, (vocab, dtype, n_ignore) in enumerate(cases):
        s = seed + 10 * k
        padded = -(-vocab // n) * n
        logits = (3.0 * randn(s, B, S, vocab)).to(dtype)
        if n_ignore == B * S:
            targets = torch.full((B, S), IGNORE)
        else:
            targets = token_ids(s + 1, vocab, (B, S), n_ignore=n_ignore)
        # Garbage in the padding columns: it would dominate the softmax if it leaked into it.
        garbage = (1e4 + randn(s + 2, B, S, padded)).to(dtype)

        local = pad_cols(logits, padded, garbage).chunk(n, -1)[r].clone().requires_grad_()
        loss = VocabParallelCrossEntropy(vocab, group)(local, targets)
        (0.5 * loss).backward()

        # The reference in the arithmetic the loss runs in (16-bit logits are widened to fp32).
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        ref_logits = logits.to(wide).requires_grad_()
        ref = F.cross_entropy(
            ref_logits.view(-1, vocab), targets.view(-1), reduction="sum", ignore_index=IGNORE
        )
        (0.5 * ref).backward()

        what = f"cross-entropy vocab={vocab} {dtype} ignored={n_ignore}"
        assert loss.dtype == wide and local.grad.dtype == dtype, what
        # Every rank computes the loss from the same all-reduced max, sum and target logit.
        assert same_on_every_rank(loss.detach(), group), f"{what}: ranks disagree on the loss"
        grad = gather_cat(local.grad, -1, group)
        assert padded == vocab or zero(grad[..., vocab:]), f"{what}: garbage columns got a gradient"
        ignored = targets == IGNORE
        assert zero(grad[ignored]) and zero(ref_logits.grad[ignored]), f"{what}: ignored tokens"
        if n_ignore == B * S:
            assert loss.item() == 0.0 and ref.item() == 0.0, what
            continue
        tol = FP64 if dtype == torch.float64 else FP32
        close_scalar(loss, ref, f"{what}: loss", tol)
        if dtype == torch.bfloat16:
            # Bitwise: 16-bit logits are widened once and the loss runs in fp32, so it equals the fp32
            # run on the widened values, and the gradient is that run's gradient rounded once to bf16
            # (which the fp32 cases compare against F.cross_entropy). Computing the softmax or the
            # gradient in bf16 would break this; a bound like LOW_PRECISION would not notice.
            wide_local = local.detach().float().requires_grad_()
            wide_loss = VocabParallelCrossEntropy(vocab, group)(wide_local, targets)
            (0.5 * wide_loss).backward()
            assert torch.equal(loss, wide_loss), f"{what}: loss differs from the fp32 run"
            assert torch.equal(local.grad, wide_local.grad.to(dtype)), f"{what}: grad is not rounded once"
        else:
            errs[what] = close(grad[..., :vocab], ref_logits.grad, f"{what}: grad", tol["rtol"])
    return errs


def tied_case(tp: int, dp: int) -> dict:
    """Embedding and a pad_output head sharing one Parameter, through the vocab-parallel loss, against
    one process running embedding + linear with one shared weight: loss and assembled gradient (the sum
    of the embedding's and the head's contributions)."""
    group, _, n, seed = setup(tp, dp, 6)
    B, S, D = 2, 4 * n, 6
    errs = {}
    for k, (vocab, sp) in enumerate((v, sp) for v in (4 * n, 4 * n - 3, n + 1) for sp in (False, True)):
        s = seed + 10 * k
        E = randn(s, vocab, D)
        ids, targets = token_ids(s + 1, vocab, (B, S)), token_ids(s + 2, vocab, (B, S), n_ignore=2)

        emb = VocabParallelEmbedding(vocab, D, group, sequence_parallel=sp)
        head = ColumnParallelLinear(D, vocab, group, pad_output=True)
        assert head.weight.sharding == emb.weight.sharding and head.weight.shape == emb.weight.shape
        head.weight = emb.weight
        with torch.no_grad():
            emb.weight.copy_(emb.weight.sharding.take(E))
        h = torch.tanh(emb(ids))
        h = gather_from_sp(h, group) if sp else copy_to_tp(h, group)  # enter the head's region
        loss = VocabParallelCrossEntropy(vocab, group)(head(h), targets)
        loss.backward()

        E_ref = E.clone().requires_grad_()
        logits_ref = F.linear(torch.tanh(F.embedding(ids, E_ref)), E_ref)
        ref = F.cross_entropy(logits_ref.view(-1, vocab), targets.view(-1), reduction="sum")
        ref.backward()

        what = f"tied vocab={vocab} sp={sp}"
        close_scalar(loss, ref, f"{what}: loss", FP32)
        grads = gather_cat(emb.weight.grad, 0, group)
        assert vocab == grads.shape[0] or zero(grads[vocab:]), f"{what}: padding rows got a gradient"
        errs[what] = close(gather_full(emb.weight.grad, emb.weight.sharding, group), E_ref.grad, what)
    return errs


@pytest.mark.parametrize(
    "case",
    [column_case, row_case, embedding_case, cross_entropy_case, tied_case],
    ids=["column", "row", "embedding", "cross-entropy", "tied-head"],
)
def test_layer_matches_single_process(tp_layout, case):
    world, tp, dp = tp_layout
    world.run(case, tp, dp)

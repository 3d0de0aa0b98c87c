"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism (Korthikanti et al.
2022), over one tensor-parallel group of n ranks.

A transformer sub-block is one tensor-parallel region: it enters through a column-parallel matmul and
leaves through a row-parallel one, so it costs one collective on the way in and one on the way out:

    Y = X A,   A = [A_1 .. A_n] split by columns   -> rank r computes Y_r = X A_r   (no communication)
    Z = Y B,   B = [B_1; ..; B_n] split by rows    -> Z = sum_r Y_r B_r            (all-reduce)

Without sequence parallelism X is replicated and enters through copy_to_tp (its backward all-reduces
dX); with it X is sharded along the sequence and enters through an all-gather, and Z leaves through a
reduce-scatter along the sequence instead of the all-reduce. Weights are stored as (out, in) like
nn.Linear, so a column-parallel weight is split on dim 0 and a row-parallel one on dim 1; the sharding
facts on each weight say so (parallel.sharding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import gather_from_tp, reduce_from_tp, reduce_scatter_to_sp
from parallel.grid import group_rank, group_size
from parallel.precision import wide
from parallel.sharding import Sharding, set_sharding, sharding_of


def _rank_size(group) -> tuple[int, int]:
    return group_rank(group), group_size(group)


def _divide(value: int, n: int, what: str) -> int:
    if value % n:
        raise ValueError(f"{what}={value} is not divisible by the tensor-parallel size {n}")
    return value // n


def _row_split_parameter(rows: int, cols: int, group, pad: bool, what: str) -> nn.Parameter:
    """A (rows, cols) parameter split by rows over the group; with `pad`, rows are zero-padded to a
    multiple of the group size first (the vocabulary), else they must divide evenly."""
    rank, n = _rank_size(group)
    padded = -(-rows // n) * n if pad else rows
    weight = nn.Parameter(torch.empty(_divide(padded, n, what), cols))
    sharding = Sharding(
        full_shape=(rows, cols),
        split_dim=0,
        num_shards=n,
        shard_index=rank,
        padded_size=padded if padded != rows else None,
    )
    return set_sharding(weight, sharding)


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T with W split by output features (dim 0). The input must already be inside the
    region (replicated or gathered); the output stays split unless `gather_output` (all-gather on the
    last dim, padding dropped). `pad_output` pads the output features to a multiple of n (the vocabulary
    of the head); the padded rows are zero, so split outputs carry zero columns there."""

    def __init__(self, in_features, out_features, group, gather_output=False, pad_output=False, bias=False):
        super().__init__()
        self.group = group
        self.gather_output, self.out_features = gather_output, out_features
        self.weight = _row_split_parameter(
            out_features, in_features, group, pad=pad_output, what="out_features"
        )
        self.bias = None
        if bias:  # split with the output features it is added to: no reduction involved
            s = sharding_of(self.weight)
            self.bias = set_sharding(
                nn.Parameter(torch.zeros(self.weight.shape[0])),
                Sharding((out_features,), 0, s.num_shards, s.shard_index, s.padded_size),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        return gather_from_tp(y, self.group)[..., : self.out_features]


class RowParallelLinear(nn.Module):
    """z = sum_r x_r W_r^T with W split by input features (dim 1): the partial products are all-reduced,
    or reduce-scattered along the sequence under sequence parallelism. A bias is added once, after the
    reduction (added before it, it would be counted n times)."""

    def __init__(self, in_features, out_features, group, sequence_parallel=False, bias=False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        rank, n = _rank_size(group)
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, n, "in_features")))
        set_sharding(
            self.weight,
            Sharding(full_shape=(out_features, in_features), split_dim=1, num_shards=n, shard_index=rank),
        )
        self.bias = None
        if bias:
            # Replicated. Under sequence parallelism each rank adds it to its own sequence chunk only, so
            # its gradient is partial and is summed over the group.
            self.bias = set_sharding(
                nn.Parameter(torch.zeros(out_features)),
                Sharding(full_shape=(out_features,), partial_grad=sequence_parallel),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        z = (
            reduce_scatter_to_sp(partial, self.group)
            if self.sequence_parallel
            else reduce_from_tp(partial, self.group)
        )
        return z + self.bias if self.bias is not None else z


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the group: the vocabulary is padded to a multiple of n and rank r owns
    ids [r*V/n, (r+1)*V/n). Ids owned elsewhere look up nothing (zeros); the sum over ranks (all-reduce,
    or reduce-scatter along the sequence under sequence parallelism) gives every token its row."""

    def __init__(self, vocab_size, dim, group, sequence_parallel=False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _row_split_parameter(vocab_size, dim, group, pad=True, what="vocab_size")
        self.per_rank = self.weight.shape[0]
        self.start = group_rank(group) * self.per_rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        local = local.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(local, self.group)
        return reduce_from_tp(local, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """sum_t [log sum_v exp(l_tv) - l_t,y_t] with the vocabulary split over the group, never gathering
    the logits: a max (all-reduce MAX) for stability, the sum of exponentials (all-reduce SUM) and the
    target logit, found on the rank that owns it (all-reduce SUM). Backward is local:
    d loss / d l_tv = softmax_tv - [v == y_t]."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        ctx.input_dtype = logits.dtype
        logits = wide(logits)
        local_vocab = logits.shape[-1]
        columns = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
        if columns[-1] >= vocab_size:  # padded vocabulary columns take no probability
            logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
        logit_max = logits.max(dim=-1).values
        dist.all_reduce(logit_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logit_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = targets != ignore_index
        mine = valid & (targets >= vocab_start) & (targets < vocab_start + local_vocab)
        local_targets = (targets - vocab_start).masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        dist.all_reduce(target_logit, group=group)
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_targets, mine, valid)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        softmax, local_targets, mine, valid = ctx.saved_tensors
        grad = softmax  # reused in place: this graph is backpropagated once
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_(valid.unsqueeze(-1).to(grad.dtype) * grad_output)
        return grad.to(ctx.input_dtype), None, None, None, None, None


class VocabParallelCrossEntropy(nn.Module):
    """Token-loss sum over logits split by vocabulary (the output of a column-parallel head)."""

    def __init__(self, vocab_size: int, group, ignore_index: int = -100):
        super().__init__()
        self.group, self.vocab_size, self.ignore_index = group, vocab_size, ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        vocab_start = dist.get_rank(self.group) * logits.shape[-1]
        return _VocabParallelCrossEntropy.apply(
            logits, targets, self.group, vocab_start, self.vocab_size, self.ignore_index
        )

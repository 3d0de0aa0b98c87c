"""The model's replaceable parts for tensor (and sequence) parallelism, built from parallel/.

Per block, the attention and the MLP are each one tensor-parallel region: Q, K, V and the MLP's gate and
up projections are column-parallel (heads and hidden units split), the output and down projections
row-parallel. The embedding and the output head split the (padded) vocabulary, and the loss is the
vocabulary-parallel cross-entropy, so full logits are never gathered; a tied head shares the
embedding's shard.

Without sequence parallelism the residual stream, the norms and dropout on it are replicated over the
tensor group; regions are entered with copy_to_tp and left with an all-reduce. With it they run on
sequence chunks: the embedding and every row layer end in a reduce-scatter along the sequence, every
region starts with an all-gather, and the norm gains, whose gradients then come from one chunk each, are
marked `partial_grad` and summed over the group after backward.
"""

from __future__ import annotations

import torch
from torch import nn

from dtrain.model import Layers, RMSNorm
from parallel import rng
from parallel.collectives import copy_to_tp, gather_from_sp
from parallel.sharding import Sharding, set_sharding
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
)


class _RegionEntry(nn.Module):
    def __init__(self, group, sequence_parallel: bool):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)


class TensorParallelLayers(Layers):
    def __init__(
        self,
        group,
        tp_rank: int,
        tp_size: int,
        vocab_size: int,
        sequence_parallel: bool,
        ep_group=None,
        cp_group=None,
    ):
        super().__init__(ep_group, cp_group)
        self.group = group
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.vocab_size = vocab_size
        self.sequence_parallel = sequence_parallel

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, self.group, bias=bias)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return RowParallelLinear(
            in_features, out_features, self.group, sequence_parallel=self.sequence_parallel
        )

    def replicated_column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        # Each rank uses only the key/value head of its own query heads: its gradient is partial.
        layer = nn.Linear(in_features, out_features, bias=bias)
        for p in layer.parameters():
            set_sharding(p, Sharding(full_shape=tuple(p.shape), partial_grad=True))
        return layer

    def norm(self, dim: int, eps: float) -> nn.Module:
        layer = RMSNorm(dim, eps)
        set_sharding(layer.weight, Sharding(full_shape=(dim,), partial_grad=self.sequence_parallel))
        return layer

    def head_norm(self, head_dim: int, eps: float) -> nn.Module:
        # One gain shared by every head; each tensor rank normalises only its own heads, so its gradient
        # is this rank's share, summed over the group after backward.
        layer = RMSNorm(head_dim, eps)
        set_sharding(layer.weight, Sharding(full_shape=(head_dim,), partial_grad=True))
        return layer

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        return VocabParallelEmbedding(
            vocab_size, d_model, self.group, sequence_parallel=self.sequence_parallel
        )

    def head(self, d_model: int, vocab_size: int) -> nn.Module:
        return ColumnParallelLinear(d_model, vocab_size, self.group, pad_output=True)

    def loss(self) -> nn.Module:
        return VocabParallelCrossEntropy(self.vocab_size, self.group)

    def moe_tensor_split(self) -> dict:
        # Tokens, not experts, are split over the tensor group: under SP the block input is already this
        # rank's sequence chunk; without SP the layer takes its chunk of the replica and gathers back.
        return {"tp_group": self.group, "split_tokens": not self.sequence_parallel}

    def region_entry(self) -> nn.Module:
        return _RegionEntry(self.group, self.sequence_parallel)

    def split_region_rng(self):
        return rng.split_region(self.tp_rank)

    def residual_rng(self):
        if self.sequence_parallel:
            return rng.split_region(self.tp_rank)
        return super().residual_rng()


def layers_for(model_cfg, grid, sequence_parallel: bool) -> Layers:
    """Dense parts on one tensor rank, tensor-parallel parts otherwise; experts over the ep group; ring
    attention over the cp group."""
    ep_group = grid.ep_group if grid.size("ep") > 1 else None
    cp_group = grid.cp_group if grid.size("cp") > 1 else None
    if grid.size("tp") == 1:
        return Layers(ep_group, cp_group)
    return TensorParallelLayers(
        grid.tp_group,
        grid.rank_in("tp"),
        grid.size("tp"),
        model_cfg.vocab_size,
        sequence_parallel,
        ep_group,
        cp_group,
    )

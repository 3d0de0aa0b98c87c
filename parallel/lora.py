"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen linear layer, dense or tensor-parallel.

    y = W x + b + s * B A dropout(x),   A: (r, in), B: (out, r), s = alpha / r

`LoRALinear` takes over a linear layer's own parameters under their own names (`weight`, `bias`) and adds
`lora_A.weight` and `lora_B.weight`, the names PEFT saves. Dropout acts on the adapter's input only, as in
PEFT. The adapter follows the base layer's tensor split (parallel.tensor_parallel):

  column-parallel W_r (output rows split):  y_r = W_r x + s * B_r (A x)
      A whole, B split by output rows like W. Rank r's gradient of A sees only its rows of dy:
      dA = s * sum_r B_r^T dy_r x^T, so A is marked partial_grad (summed over tp after backward).
  row-parallel W_r (input columns split):   z = sum_r (W_r x_r + s * B (A_r x_r))
      A split by input columns like W, B whole. The adapter's partial products join the base layer's
      own partial sums before its one reduction (all-reduce, or reduce-scatter along the sequence under
      sequence parallelism), so the adapter adds no collective: sum_r B (A_r x_r) = B (A x). Backward of
      that reduction hands every rank the whole dz; rank r's gradient of B is s * dz (A_r x_r)^T, a
      partial sum over r: B is partial_grad.
  replicated (a dense layer; key/value weights every tensor rank holds): A and B whole, partial over tp
      exactly when the base weight is (each rank uses its own key/value head).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.collectives import reduce_from_tp, reduce_scatter_to_sp
from parallel.sharding import Sharding, set_sharding, sharding_of

ADAPTER_NAMES = ("lora_A.weight", "lora_B.weight")


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_NAMES)


def adapter_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's initial values on the full (canonical) shape: A ~ kaiming_uniform_(a=sqrt(5)), i.e.
    U(-1/sqrt(in), 1/sqrt(in)); B = 0, so a fresh adapter changes nothing."""
    value = torch.empty(shape)
    if name.endswith("lora_B.weight"):
        return value.zero_()
    return nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)


class LoRALinear(nn.Module):
    """`base` (nn.Linear, or a column- or row-parallel linear without gathered output) plus an adapter.

    `split_rng`: the dropout stream of a row-parallel input (features split over the tensor ranks, so
    each rank draws its own mask); replicated inputs use the default stream, which tensor ranks share."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, split_rng=None):
        super().__init__()
        if getattr(base, "gather_output", False):
            raise ValueError("LoRA on a column-parallel layer with gathered output is not supported")
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        s = sharding_of(base.weight)
        out_full, in_full = s.full_shape
        self.row_parallel = s.split_dim == 1
        self.group = getattr(base, "group", None)
        self.sequence_parallel = getattr(base, "sequence_parallel", False)
        self.split_rng = split_rng if self.row_parallel and split_rng is not None else contextlib.nullcontext
        whole = Sharding(full_shape=(rank, in_full), partial_grad=True)
        if s.split_dim is None:  # replicated: partial exactly when the base weight is
            a = Sharding(full_shape=(rank, in_full), partial_grad=s.partial_grad)
            b = Sharding(full_shape=(out_full, rank), partial_grad=s.partial_grad)
        elif s.split_dim == 0:  # column-parallel: B split with W's output rows
            if s.padded_size is not None:
                raise ValueError("LoRA on a padded column-parallel layer (the output head) is not supported")
            a, b = whole, Sharding((out_full, rank), 0, s.num_shards, s.shard_index, group=s.group)
        else:  # row-parallel: A split with W's input columns
            a = Sharding((rank, in_full), 1, s.num_shards, s.shard_index, group=s.group)
            b = Sharding(full_shape=(out_full, rank), partial_grad=True)
        local_in = base.weight.shape[1]
        local_out = base.weight.shape[0]
        self.lora_A = nn.Linear(local_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, local_out, bias=False)
        set_sharding(self.lora_A.weight, a)
        set_sharding(self.lora_B.weight, b)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        with self.split_rng():
            x = self.dropout(x)
        return self.lora_B(self.lora_A(x)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return F.linear(x, self.weight, self.bias) + self.update(x)
        partial = F.linear(x, self.weight) + self.update(x)  # both partial sums over the tensor group
        if self.sequence_parallel:
            z = reduce_scatter_to_sp(partial, self.group)
        else:
            z = reduce_from_tp(partial, self.group)
        return z + self.bias if self.bias is not None else z

"""Mixed precision with 16-bit parameters: which dtype each copy of the model state is kept in.

The model computes with parameters stored in the compute dtype (bf16 or fp16, 2 bytes); the optimizer
updates fp32 master weights kept with its moments (whole per parameter in DataParallelAdamW, sharded over
the data-parallel group inside ZeRO's flat buffers, in host memory under offload); after each step the
16-bit parameters are the masters rounded to nearest. Gradients are accumulated over micro-batches and
reduced in `grad_dtype`:

  fp32 (default): autograd produces a 16-bit param.grad per backward; a post-accumulate-grad hook adds it
                  into an fp32 main-gradient buffer and drops it, so micro-batches and ranks sum in fp32
                  (each 16-bit gradient is exact in fp32; the sums round once per addition in fp32).
  16-bit:         param.grad is a view into a 16-bit bucket, as for fp32 training: half the gradient
                  bytes and half the reduction traffic, sums rounded to 16 bits.

A DtypePolicy with `param_dtype=None` (fp32 training, fp64 exactness tests) changes nothing: parameters
are their own masters, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel.sharding import set_sharding, sharding_of


@dataclass(frozen=True)
class DtypePolicy:
    param_dtype: torch.dtype | None = None  # dtype the model computes with; None: the dtype it was built in
    grad_dtype: torch.dtype | None = None  # accumulation and reduction; None: the master dtype

    def mixed(self, master: torch.dtype) -> bool:
        return self.param_dtype is not None and self.param_dtype != master

    def compute(self, master: torch.dtype) -> torch.dtype:
        return self.param_dtype if self.mixed(master) else master

    def grads(self, master: torch.dtype) -> torch.dtype:
        return (self.grad_dtype or master) if self.mixed(master) else master


AS_BUILT = DtypePolicy()  # parameters are their own masters


def fold_grad_(param: nn.Parameter, main: torch.Tensor) -> None:
    """main += param.grad (in main's dtype), then drop param.grad: called from a post-accumulate-grad
    hook, so the next backward starts a fresh 16-bit gradient."""
    main.add_(param.grad.reshape(main.shape))
    param.grad = None


@torch.no_grad()
def master_copies(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """fp32 copies of `params` (their current values), carrying the same sharding facts, so norms,
    clipping and tensor-partial sums read them as they read the parameters."""
    return [set_sharding(nn.Parameter(p.detach().clone()), sharding_of(p)) for p in params]


@torch.no_grad()
def to_compute_(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    """Store the parameters in the compute dtype (rounded to nearest); buffers keep their dtype."""
    for p in params:
        p.data = p.data.to(dtype)

"""The one interface between a training loop and data parallelism: gradient synchronisation plus the
optimizer step, whatever holds the gradients and the optimizer state.

Implementations: `parallel.data_parallel.DataParallelAdamW` (whole gradients all-reduced in buckets,
torch's AdamW), `parallel.zero.ZeroDataParallel` (stages 1 and 2; stage 3 when composed with
`parallel.zero3.ShardedParams`) and `parallel.zero_experts.ZeroWithExperts` (one ZeRO wrapper over dp for
dense parameters, one over the expert-data-parallel group for experts). A step with any of them:

    for each micro-batch: sync.before_backward(is_last); loss.backward()
    sync.finish_grad_sync()               # reductions done, tensor-partial and tied gradients summed
    sync.scale_grads(1 / loss_scale)      # fp16 only
    norm = sync.grad_norm()               # the canonical model's norm, the same on every rank
    clip_(sync, max_norm, norm); sync.step(lr); sync.zero_grad()

Every implementation reduces gradients as SUMs (the loss is already divided by the global batch's token
count), counts each canonical element once in the norm, and exposes its optimizer state in canonical form
(whole tensors per parameter, as torch.optim.AdamW would hold them) for layout-independent checkpoints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from parallel.sharding import clip_coefficient

Held = dict[str, dict[str, int]]  # {"device" | "host": {"params" | "grads" | "optimizer": bytes}}
OptimizerState = dict[nn.Parameter, dict[str, torch.Tensor]]


@dataclass
class AdamWConfig:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def decays(p: nn.Parameter) -> bool:
    """Weight decay on matrices only (norm gains are not decayed)."""
    return p.dim() >= 2


class GradSync(Protocol):
    def before_backward(self, is_last: bool) -> None:
        """Called before each micro-batch's backward; `is_last`: the step's final one."""

    def finish_grad_sync(self) -> None:
        """Wait for the step's reductions; sum tensor-partial gradients over tp and tied ones over the
        embedding group, so every gradient this rank holds is final."""

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """g <- factor * g on every gradient (or gradient shard) this rank holds."""

    def grad_norm(self) -> torch.Tensor:
        """||g|| of the whole canonical model, each element counted once; the same on every rank."""

    def step(self, lr: float) -> None:
        """AdamW with learning rate `lr`; afterwards the parameters are ready for the next forward."""

    def zero_grad(self) -> None: ...

    def state_dict(self) -> OptimizerState:
        """AdamW state per parameter, whole (collective where it is sharded)."""

    def load_state_dict(self, state: OptimizerState) -> None:
        """Inverse of `state_dict`; parameters must already hold their loaded values."""

    def master_weights(self) -> dict[nn.Parameter, torch.Tensor]:
        """With 16-bit parameters, the fp32 master weights, whole per parameter (collective where they are
        sharded; under ZeRO-3 inside params_whole()); empty when the parameters are their own masters."""

    def params_whole(self) -> contextlib.AbstractContextManager:
        """Every parameter whole for the duration (ZeRO-3 gathers, then writes changes back to shards)."""

    def held_bytes(self) -> Held:
        """Parameters, gradients and optimizer state this rank holds, counted from the real tensors."""


def clip_(sync: GradSync, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    coef = clip_coefficient(max_norm, total_norm)
    if coef is not None:
        sync.scale_grads(coef)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def no_bytes() -> Held:
    return {where: {"params": 0, "grads": 0, "optimizer": 0} for where in ("device", "host")}

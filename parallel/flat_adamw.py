"""AdamW on flat shards, element for element as torch.optim.AdamW's single-tensor path (decoupled weight
decay p *= 1 - lr*wd, then the bias-corrected Adam update), so a rank's update of its slice equals what
torch's AdamW would compute on the whole parameter with the same gradient."""

from __future__ import annotations

import torch

from parallel.grad_sync import AdamWConfig


@torch.no_grad()
def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    decayed: list[slice],
    lr: float,
    step: int,
    a: AdamWConfig,
) -> None:
    """One update of `param` in place; `decayed`: the ranges of `param` weight decay applies to (the
    matrices'; adjacent ones merged); `step` counts from 1."""
    beta1, beta2 = a.betas
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if a.weight_decay:
        for r in decayed:  # torch's p.mul_(1 - lr*wd): the Python float rounded once to p's dtype
            param[r].mul_(1 - lr * a.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # torch's (sqrt(v) / bc2).add_(eps), with one temporary instead of two: the same values.
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(a.eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

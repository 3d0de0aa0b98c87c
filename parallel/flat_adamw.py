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
    decay: torch.Tensor,
    lr: float,
    step: int,
    a: AdamWConfig,
) -> None:
    """One update of `param` in place; `decay` is 1.0 where weight decay applies, else 0.0; `step` counts
    from 1."""
    beta1, beta2 = a.betas
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    # The factor torch uses for p *= 1 - lr*wd (the Python float rounded once to the parameter's dtype,
    # whatever the default dtype), on decayed elements only.
    factor = torch.full((), 1 - lr * a.weight_decay, dtype=param.dtype, device=param.device)
    param.mul_(torch.where(decay > 0, factor, torch.ones_like(factor)))
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(a.eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

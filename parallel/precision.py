"""Mixed precision: the compute dtype, fp32 master weights, and fp16 dynamic loss scaling.

Training stores parameters in bf16/fp16 and keeps fp32 master weights with the optimizer state
(parallel.mixed_precision: the dtype policy the gradient synchronisations take); the forward then runs in
the parameters' dtype, with no autocast. The library wrapper (parallel.wrap) does the same with fp32
gradients.

fp16 has a narrow exponent range, so the loss is multiplied by a scale S before backward and gradients
are divided by S before the step. If any gradient overflowed, the step is skipped and S halves; after
`growth_interval` clean steps S doubles. Every rank must take the same decision: the trainer derives
"overflowed" from the global gradient norm, which is reduced over every group and hence identical on all
ranks (a non-finite element anywhere makes it non-finite everywhere).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: 16-bit tensors are widened for sums that underflow or lose digits (norms,
    softmax, losses); fp64 stays fp64, which the tests use to show that two layouts compute the same
    function up to rounding."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def dtype_policy(precision: str, grad_dtype: str = "fp32"):
    """The parallel.mixed_precision.DtypePolicy of `precision`: parameters stored in its compute dtype,
    gradients reduced in `grad_dtype`; fp32 changes nothing."""
    from parallel.mixed_precision import DtypePolicy  # it imports parallel.sharding, which imports this

    if precision == "fp32":
        return DtypePolicy()
    return DtypePolicy(param_dtype=DTYPES[precision], grad_dtype=DTYPES[grad_dtype])


class LossScaler:
    """Dynamic loss scale; `scale` is 1 and never changes unless `enabled` (fp16)."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def update(self, overflowed: bool) -> None:
        if not self.enabled:
            return
        if overflowed:
            self.scale, self.clean_steps = self.scale * 0.5, 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale, self.clean_steps = self.scale * 2.0, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])

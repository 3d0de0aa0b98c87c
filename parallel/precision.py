"""Mixed precision: compute dtype under autocast, fp32 master weights, and fp16 dynamic loss scaling.

Parameters stay fp32 (they are the master weights the optimizer updates); matmuls run in bf16/fp16
under torch.autocast, and gradients arrive in fp32, so the data-parallel reduction is fp32 too.

fp16 has a narrow exponent range, so the loss is multiplied by a scale S before backward and gradients
are divided by S before the step. If any gradient overflowed, the step is skipped and S halves; after
`growth_interval` clean steps S doubles. Every rank must take the same decision: the trainer derives
"overflowed" from the global gradient norm, which is reduced over every group and hence identical on all
ranks (a non-finite element anywhere makes it non-finite everywhere).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: 16-bit tensors are widened for sums that underflow or lose digits (norms,
    softmax, losses); fp64 stays fp64, which the tests use to show that two layouts compute the same
    function up to rounding."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


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

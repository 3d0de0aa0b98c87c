"""What parallel.wrap refuses, each with one line naming the module or parameter: options that do not go
together, ZeRO-3 units that miss or share parameters, a parameter used outside its unit, a unit whose
output carries no gradient, running statistics and other buffers that would need synchronising,
accumulation without no_sync() where the reduction happens in the last backward, gradients reset behind
the wrapper's back; and what it does with non-finite gradients."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel.wrap import wrap
from tests.unit.foreign_models import build, unit_classes


def one_line(message: str) -> bool:
    return message.startswith("parallel.wrap: ") and "\n" not in message


# --- at wrap time, before any collective (no process group needed) -----------------------------------


def wrap_error(model, **options) -> str:
    with pytest.raises((ValueError, TypeError)) as raised:
        wrap(model, **options)
    message = str(raised.value)
    assert one_line(message), message
    return message


def test_options_that_do_not_go_together():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    assert "zero=3 needs units" in wrap_error(mlp, zero=3)
    assert "offload='all' needs zero=3" in wrap_error(mlp, zero=2, offload="all")
    assert "offload='optimizer' needs zero=1, 2 or 3" in wrap_error(mlp, offload="optimizer")
    assert "units apply to zero=3 only" in wrap_error(mlp, zero=1, units=[mlp])
    assert "precision must be one of" in wrap_error(mlp, precision="fp8")
    assert "float32" in wrap_error(mlp.double(), precision="bf16")  # the masters of bf16 copies are fp32
    assert "units name LayerNorm" in wrap_error(mlp, zero=3, units=[nn.LayerNorm, mlp])
    assert "not a submodule" in wrap_error(mlp, zero=3, units=[nn.Linear(2, 2), mlp])


def test_batch_norm_running_statistics_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    message = wrap_error(model)
    assert "'1' (BatchNorm1d) keeps running statistics" in message
    nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))  # accepted (no buffers)


def test_units_that_miss_parameters_name_them():
    model = build("llama")
    message = wrap_error(model, zero=3, units=unit_classes("llama"))
    assert "units leave out model.embed_tokens.weight, model.norm.weight" in message
    assert "or the model itself" in message


def test_tied_weights_in_two_units_are_refused():
    model = build("llama")  # the head is tied to the embedding
    message = wrap_error(model, zero=3, units=[*unit_classes("llama"), model.model.embed_tokens, model])
    assert "'model.embed_tokens.weight' (model.embed_tokens)" in message
    assert "'lm_head.weight' (LlamaForCausalLM (the model))" in message
    assert "shared across ZeRO-3 units" in message


# --- during training, on every rank alike ----------------------------------------------------------


class Peek(nn.Module):
    """Reads its child's weight in its own forward, after the child ran: outside the child's unit."""

    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.outer(self.inner(x) + x @ self.inner.weight.t())


class Boxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return types.SimpleNamespace(value=self.linear(x))  # a container the wrapper cannot look into


class HidesItsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.box, self.head = Boxed(), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.box(x).value)


class CountsInputs(nn.Module):
    """Updates a buffer from each rank's own batch, as running statistics do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += x.detach().sum()
        return self.linear(x)


def rows() -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(dist.get_rank()))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def runtime_error_case(scenario: str) -> str:
    """The message of the error `scenario` raises on this rank."""
    try:
        if scenario == "used outside its unit":
            model = Peek()
            dp = wrap(model, zero=3, units=[model.inner, model])
            dp(rows()).sum().backward()
        elif scenario == "output without gradient":
            model = HidesItsOutput()
            dp = wrap(model, zero=3, units=[Boxed, model])
            dp(rows()).sum().backward()
        elif scenario == "buffer differs":
            dp = wrap(CountsInputs())
            dp(rows()).sum().backward()
            dp.step()
        elif scenario.startswith("accumulation without no_sync"):
            dp = wrap(mlp(), zero=int(scenario[-1]))
            for _ in range(2):
                dp(rows()).sum().backward()
        elif scenario == "gradients reset":
            model = mlp()
            dp = wrap(model)
            dp(rows()).sum().backward()
            dp.step()
            model.zero_grad()
            dp(rows()).sum().backward()
        elif scenario == "non-finite in fp32":
            dp = wrap(mlp())
            (dp(rows()).sum() * float("nan")).backward()
            dp.step()
    except (RuntimeError, FloatingPointError) as e:
        return str(e)
    return "no error"


RUNTIME_ERRORS = {
    "used outside its unit": "parameter 'inner.weight' of ZeRO-3 unit 'inner' was used by aten.",
    "output without gradient": "ZeRO-3 unit 'box' returned no tensor that requires grad",
    "buffer differs": "buffer 'seen' differs between ranks after the first step",
    "accumulation without no_sync, zero=0": "second synchronising forward before step() under zero=0",
    "accumulation without no_sync, zero=1": "second synchronising forward before step() under zero=1",
    "gradients reset": "gradients were set to None outside the wrapper",
    "non-finite in fp32": "the gradient norm is nan at step 1 (fp32)",
}


@pytest.mark.parametrize("scenario", list(RUNTIME_ERRORS))
def test_runtime_errors_are_one_line_on_every_rank(world2, scenario):
    for message in world2.run(runtime_error_case, scenario):
        assert RUNTIME_ERRORS[scenario] in message, message
        assert one_line(message), message


def overflow_case() -> dict:
    """fp16: a gradient that overflows on rank 1 only; the global norm is non-finite on both ranks, so
    both skip the update and halve the loss scale; the next step goes through."""
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    dp = wrap(model, zero=2, precision="fp16")  # fp16 parameters; the fp32 rows are cast as they enter
    loss = dp(rows()).mean() * (float("inf") if dist.get_rank() == 1 else 0.01)
    dp.scale(loss).backward()
    first = dp.step()
    masters = dp.state_dict()["model"].values()  # the fp32 weights (collective)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, masters, strict=True))
    loss = dp(rows()).mean() * 0.01  # small: no fp16 overflow at the scale of 2^15
    dp.scale(loss).backward()
    second = dp.step()
    return {
        "first": first.skipped,
        "unchanged": unchanged,
        "scale": dp.scaler.scale,
        "second": second.skipped,
    }


def test_fp16_overflow_on_one_rank_is_skipped_by_all(world2):
    for r in world2.run(overflow_case):
        assert r == {"first": True, "unchanged": True, "scale": 2.0**15, "second": False}, r

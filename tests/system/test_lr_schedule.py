"""The learning-rate schedule (dtrain.trainer.lr_at): linear warm-up to lr, reached exactly once, then a
cosine down to exactly min_lr at the last step. Pure arithmetic, no processes."""

from __future__ import annotations

import itertools
import math

import pytest

from dtrain.config import TrainConfig
from dtrain.trainer import lr_at


def schedule(steps: int, warmup: int, lr: float = 1.0, min_lr: float = 0.1) -> list[float]:
    t = TrainConfig(steps=steps, warmup_steps=warmup, lr=lr, min_lr=min_lr)
    return [lr_at(step, t) for step in range(steps)]


def test_values_of_a_short_run():
    cos = [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]
    assert schedule(6, 2) == pytest.approx([0.5, 1.0, *cos, 0.1], abs=1e-12)
    assert schedule(6, 2)[-1] == 0.1  # exactly


@pytest.mark.parametrize(("steps", "warmup"), [(6, 2), (10, 3), (200, 20), (7, 0), (5, 1), (2, 1), (2, 0)])
def test_peak_once_then_monotone_down_to_min_lr(steps, warmup):
    lrs = schedule(steps, warmup, lr=3e-3, min_lr=3e-4)
    assert lrs.count(3e-3) == 1  # the peak, exactly lr, exactly once
    peak = lrs.index(3e-3)
    assert peak == max(warmup - 1, 0)
    assert lrs[-1] == 3e-4  # exactly min_lr at the last step
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))  # warm-up rises
    assert all(a > b for a, b in itertools.pairwise(lrs[peak:]))  # decay strictly falls
    assert [lrs[s] for s in range(warmup)] == pytest.approx([3e-3 * (s + 1) / warmup for s in range(warmup)])


def test_without_warmup_starts_at_lr():
    lrs = schedule(5, 0)
    assert lrs[0] == 1.0 and lrs[-1] == 0.1
    assert lrs[2] == pytest.approx(0.55)  # half-way through the cosine


def test_single_step_and_warmup_as_long_as_the_run():
    assert schedule(1, 0) == [1.0]  # one step, no room for a decay: the peak
    assert schedule(1, 1) == [1.0]
    assert schedule(3, 3) == pytest.approx([1 / 3, 2 / 3, 1.0])  # all warm-up
    assert schedule(2, 4) == pytest.approx([0.25, 0.5])  # warm-up longer than the run: lr never reached


def test_steps_past_the_end_stay_at_min_lr():
    t = TrainConfig(steps=6, warmup_steps=2, lr=1.0, min_lr=0.1)
    assert lr_at(6, t) == 0.1 and lr_at(100, t) == 0.1


def test_min_lr_equal_to_lr_is_flat_after_warmup():
    assert schedule(5, 2, lr=0.5, min_lr=0.5) == [0.25, 0.5, 0.5, 0.5, 0.5]

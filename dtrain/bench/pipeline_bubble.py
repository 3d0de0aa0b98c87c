"""The pipeline bubble for the benchmark (dtrain.bench.pipeline): what it should be, and what each rank
measures.

Expected: FORMULAS.md's idle share for the schedule (`formula_bubble`), and parallel.pipeline_schedules'
simulate() for the exact action order, ours (`simulate_ours`) or PyTorch's (`simulate_order`).
Measured: every rank's busy time in a step on `CLOCK`, the wall time of its chunk forwards
(`time_forwards`) and of every torch.autograd.backward / grad call (`BackwardTimer`); the executors stamp
`CLOCK.pipeline_end` when their schedule returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

SCHEDULES = ("gpipe", "1f1b", "interleaved")
VIRTUAL_STAGES = 2  # chunks per rank for the interleaved schedule


def virtual_stages(schedule: str) -> int:
    return VIRTUAL_STAGES if schedule == "interleaved" else 1


def formula_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle share of the pipeline phase from FORMULAS.md: (p-1)/(m+p-1) for GPipe and 1F1B; interleaved
    is given as bubble over ideal time (p-1)/(v*m), which as an idle share is (p-1)/(v*m+p-1)."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    over_ideal = (p - 1) / (v * m)
    return over_ideal / (1 + over_ideal)


def simulate_ours(schedule: str, p: int, m: int) -> dict:
    from parallel import pipeline_schedules as ps

    return ps.simulate(ps.build(schedule, p, m, virtual_stages(schedule)), p)


def simulate_order(order, p: int) -> tuple[float | None, str | None]:
    """simulate()'s bubble for PyTorch's own action order (`schedule.pipeline_order`: rank -> list of
    _Action or None), keeping its forwards and full backwards; else None and the reason."""
    from parallel import pipeline_schedules as ps

    if not order:
        return None, "the schedule exposes no pipeline_order"
    schedules = []
    for r in range(p):
        actions = []
        for a in order.get(r, []):
            kind = getattr(getattr(a, "computation_type", None), "value", None)
            if kind in ("F", "B"):
                actions.append(ps.Action(kind, a.stage_index, a.microbatch_index))
        schedules.append(actions)
    try:
        return ps.simulate(schedules, p)["bubble"], None
    except ps.ScheduleError as e:
        shown = "; ".join(
            f"rank {r}: " + " ".join(str(a) for a in order.get(r, [])[:6]) + " .." for r in range(p)
        )
        return None, f"its pipeline_order is not a runnable order ({e}): {shown}"


@dataclass
class Clock:
    """Busy time of this rank in the current step (seconds)."""

    forward: float = 0.0
    backward: float = 0.0
    pipeline_end: float = 0.0
    _started: list[float] = field(default_factory=list)
    _depth: int = 0

    def reset(self) -> None:
        self.forward = self.backward = self.pipeline_end = 0.0
        self._started.clear()

    @property
    def busy(self) -> float:
        return self.forward + self.backward


CLOCK = Clock()


def time_forwards(module: torch.nn.Module) -> None:
    """Add the wall time of every call of `module` to CLOCK.forward (hooks stay for the process life)."""

    def pre(*_):
        CLOCK._started.append(time.perf_counter())

    def post(*_):
        CLOCK.forward += time.perf_counter() - CLOCK._started.pop()

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


class BackwardTimer:
    """Patches torch.autograd.backward and torch.autograd.grad, in this process, to add their wall time to
    CLOCK.backward (nested calls counted once). Our executor calls torch.autograd.backward (directly or
    through Tensor.backward) and PyTorch's stage_backward does too, both resolving the module attribute at
    call time; the originals are restored on exit."""

    NAMES = ("backward", "grad")

    def __enter__(self) -> BackwardTimer:
        self._saved = {name: getattr(torch.autograd, name) for name in self.NAMES}
        for name, fn in self._saved.items():
            setattr(torch.autograd, name, self._wrap(fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(torch.autograd, name, fn)

    @staticmethod
    def _wrap(fn):
        def timed(*args, **kwargs):
            CLOCK._depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                CLOCK._depth -= 1
                if CLOCK._depth == 0:
                    CLOCK.backward += time.perf_counter() - started

        timed.__wrapped__ = fn
        return timed

"""Pipeline schedules (parallel.pipeline_schedules) as data: complete and ordered, the bubble against its
formula, the in-flight bound of 1F1B, and their errors."""

from __future__ import annotations

import pytest

from parallel import pipeline_schedules as ps

SHAPES = [(name, pp, m, v) for pp in (2, 3, 4) for m in (pp, 2 * pp, 3 * pp) for name, v in
          (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3))]  # fmt: skip


@pytest.mark.parametrize(("name", "pp", "m", "v"), SHAPES)
def test_schedule_is_complete_and_ordered(name, pp, m, v):
    schedules = ps.build(name, pp, m, v)
    chunks = pp * v
    for r, actions in enumerate(schedules):
        # Each of this rank's chunks runs every micro-batch forward once and backward once, forward first.
        mine = [c for c in range(chunks) if c % pp == r]
        expected = {(k, c, i) for k in "FB" for c in mine for i in range(m)}
        assert sorted((a.kind, a.chunk, a.microbatch) for a in actions) == sorted(expected)
        position = {(a.kind, a.chunk, a.microbatch): n for n, a in enumerate(actions)}
        assert all(position[("F", c, i)] < position[("B", c, i)] for c in mine for i in range(m))
    # Stage order and absence of deadlock: the dependency-respecting simulation runs every action.
    result = ps.simulate(schedules, pp)
    assert len(result["timeline"]) == 2 * m * chunks


@pytest.mark.parametrize(("pp", "m"), [(2, 2), (2, 6), (4, 4), (4, 8), (3, 7)])
def test_bubble_matches_formula_and_interleaving_shrinks_it(pp, m):
    for name in ("gpipe", "1f1b"):
        bubble = ps.simulate(ps.build(name, pp, m), pp)["bubble"]
        assert bubble == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    if m % pp == 0:
        for v in (2, 3):
            sim = ps.simulate(ps.build("interleaved", pp, m, v), pp)
            assert sim["bubble"] < (pp - 1) / (m + pp - 1)
            # docs/formulas.md: interleaved bubble over ideal time = (p - 1) / (v * m)
            assert sim["bubble"] / (1 - sim["bubble"]) == pytest.approx((pp - 1) / (v * m), abs=1e-12)


@pytest.mark.parametrize(("pp", "m"), [(2, 2), (2, 5), (4, 4), (4, 9)])
def test_1f1b_holds_at_most_pp_minus_rank_microbatches(pp, m):
    peaks = ps.simulate(ps.one_f_one_b(pp, m), pp)["peak_in_flight"]
    assert peaks == [min(pp - r, m) for r in range(pp)]
    assert ps.simulate(ps.gpipe(pp, m), pp)["peak_in_flight"] == [m] * pp  # GPipe holds every micro-batch


def test_schedule_errors():
    with pytest.raises(ps.ScheduleError, match="1f1b needs at least pp=4"):
        ps.one_f_one_b(4, 3)
    with pytest.raises(ps.ScheduleError, match="multiple of pp=2"):
        ps.interleaved_one_f_one_b(2, 3, 2)
    with pytest.raises(ps.ScheduleError, match="pp_virtual_stages >= 2"):
        ps.interleaved_one_f_one_b(2, 4, 1)
    assert "rank 1: F1.0" in ps.render(ps.gpipe(2, 2))

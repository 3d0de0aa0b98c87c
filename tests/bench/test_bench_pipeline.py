"""The pipeline benchmark (dtrain.bench.pipeline) at tiny sizes: it times our schedules and PyTorch's in one
run, both compute the same loss at every step, after updates too, and 1F1B holds fewer activations than
GPipe, in the ratio docs/formulas.md gives."""

from __future__ import annotations

import re

import pytest
import torch

from dtrain.bench import pipeline as bench
from dtrain.bench.pipeline_meters import ActivationMeter
from tests.tolerances import FP32

SIZES = {"--d-model": 32, "--n-layers": 4, "--n-heads": 4, "--seq-len": 16, "--micro-batch": 2, "--vocab": 96}
FAST = {"--pp": 2, "--microbatches": 4, "--steps": 1, "--warmup": 0, "--timeout": 120}
TINY = [str(x) for kv in (*FAST.items(), *SIZES.items()) for x in kv]


def test_formula_bubble_and_simulate_agree_for_the_plain_schedules():
    assert bench.formula_bubble("gpipe", 2, 8) == pytest.approx(1 / 9)
    assert bench.formula_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    # docs/formulas.md: interleaved bubble over ideal time (p-1)/(v*m), as an idle share (p-1)/(v*m+p-1).
    assert bench.formula_bubble("interleaved", 2, 8, 2) == pytest.approx(1 / 17)
    for name in ("gpipe", "1f1b"):
        assert bench.simulate_ours(name, 2, 8)["bubble"] == pytest.approx(bench.formula_bubble(name, 2, 8))


def test_benchmark_times_both_matches_losses_and_1f1b_holds_fewer_activations(capfd, tmp_path):
    csv_path = tmp_path / "out.csv"
    summary = bench.run([*TINY, "--schedules", "gpipe,1f1b,interleaved", "--csv", str(csv_path)])
    out = capfd.readouterr().out

    rows = summary["schedules"]
    assert list(rows) == ["gpipe", "1f1b", "interleaved"]
    for schedule, r in rows.items():
        # PyTorch's pipelining must run every schedule: its failure fails the test.
        assert r["errors"] == {} and set(r["impls"]) == {"ours", "pytorch"}, schedule
        ours, theirs = r["impls"]["ours"], r["impls"]["pytorch"]
        for impl in (ours, theirs):
            assert impl["median_s"] > 0 and impl["pipeline_s"] > 0
            assert 0 <= impl["bubble"] < 1
        assert r["ratio"] == pytest.approx(ours["median_s"] / theirs["median_s"])
        # Same canonical weights, data and recipe: the same loss at all 3 steps, the last two after updates.
        losses = torch.tensor(ours["losses"], dtype=torch.float64)
        assert len(losses) == 3, schedule
        torch.testing.assert_close(losses, torch.tensor(theirs["losses"], dtype=torch.float64), **FP32)
        # Every saved activation is released by the end of the counting step.
        assert ours["held_after_bytes"] == [0, 0] and theirs["held_after_bytes"] == [0, 0]
    assert rows["gpipe"]["simulate"] == pytest.approx(rows["gpipe"]["formula"])

    # GPipe holds all m = 4 micro-batches, 1F1B at most p - r = 2 on rank 0 (and 1 on rank 1).
    gpipe, one_f_one_b = rows["gpipe"]["impls"]["ours"], rows["1f1b"]["impls"]["ours"]
    assert one_f_one_b["peak_bytes"][0] < gpipe["peak_bytes"][0]
    assert gpipe["peak_bytes"][0] / one_f_one_b["peak_bytes"][0] == pytest.approx(2, rel=0.05)
    assert gpipe["peak_bytes"][1] / one_f_one_b["peak_bytes"][1] == pytest.approx(4, rel=0.05)

    for schedule in ("gpipe", "1f1b", "interleaved v=2"):
        assert re.search(
            rf"^  {re.escape(schedule)}\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d{{3}}\s+\d+\.\d{{6}}", out, re.M
        )
    assert "peak activation memory" in out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + 3 * 2 and lines[0].startswith("pp,microbatches,")


def test_activation_meter_releases_a_graph_dropped_without_a_backward():
    """A graph that no backward frees (kept between two passes, or never used) must leave the meter at
    zero once dropped: the meter's saves may not hold the graph alive."""
    layer = torch.nn.Linear(4, 4)
    with ActivationMeter([layer]) as meter:
        out = torch.tanh(layer(torch.randn(3, 4, requires_grad=True)))  # tanh saves its own output
        assert meter.current > 0
        del out
    assert meter.current == 0 and meter.live == {}

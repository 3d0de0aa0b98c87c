"""The step-time benchmark (dtrain.bench.step_time) at tiny sizes: every pair runs ours and PyTorch's own in
one world, both train to the same losses (they start from the same weights on the same data with the same
recipe), and the table prints each pair's ratio and verdict."""

from __future__ import annotations

import re

import pytest
import torch

from dtrain.bench import harness
from dtrain.bench import step_time as bench
from tests.tolerances import FP32

SIZES = {"--d-model": 32, "--n-layers": 2, "--n-heads": 4, "--n-kv-heads": 2, "--seq-len": 16, "--vocab": 96}
TINY = ["--steps", "2", "--warmup", "0", "--global-batch", "4", "--micro-batch", "1"]
TINY += [str(x) for kv in SIZES.items() for x in kv]


@pytest.mark.parametrize(
    "pairs",
    ["ddp,1f1b,tp,ledger,1f1b-split", pytest.param(",".join(bench.PAIRS), marks=pytest.mark.slow)],
    ids=["some", "all"],
)
def test_every_pair_runs_both_sides_to_the_same_losses(capfd, tmp_path, pairs):
    csv_path = tmp_path / "out.csv"
    summary = bench.run([*TINY, "--pairs", pairs, "--csv", str(csv_path)])
    out = capfd.readouterr().out
    assert list(summary["pairs"]) == pairs.split(",")
    for pair, row in summary["pairs"].items():
        # PyTorch's side must run: its failure fails the test, never a missing row.
        assert row["errors"] == {} and set(row["impls"]) == {"ours", "theirs"}, (pair, row["errors"])
        ours, theirs = row["impls"]["ours"], row["impls"]["theirs"]
        assert row["ratio"] == pytest.approx(ours["median_s"] / theirs["median_s"])
        assert (
            len(ours["losses"]) == 3
        )  # the untimed step and two timed ones, all after updates but the first
        losses = torch.tensor(ours["losses"], dtype=torch.float64)
        torch.testing.assert_close(losses, torch.tensor(theirs["losses"], dtype=torch.float64), **FP32)
        if pair in bench.SPLIT_PAIRS:  # the two-pass backward is bitwise a single one, updates and all
            assert ours["losses"] == theirs["losses"]
        lo, hi = row["interval"]
        assert min(row["paired_ratios"]) <= lo <= row["paired"] <= hi <= max(row["paired_ratios"])
        assert re.search(
            rf"^{re.escape(pair)}\s+.*\d+\.\d{{3}}\s+\d+\.\d{{3}}\s+\d+\.\d{{3}} \[\d+\.\d{{3}}, "
            rf"\d+\.\d{{3}}\]\s+\S+\s+(ok|above|SLOWER|\()",
            out,
            re.M,
        )
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 1 + 2 * len(summary["pairs"]) and rows[0].startswith("ranks,")


def test_unknown_pair_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--pairs", "ddp,zero9"])
    assert e.value.code == 2
    assert "--pairs zero9: choose from ddp, zero1" in capsys.readouterr().err


def test_median_interval_takes_the_order_statistics_binomial_coverage_allows():
    values = [float(v) for v in range(20, 0, -1)]  # any order
    # n = 20 at 95%: P(Binomial(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6) = 0.0577: the 6th and 15th.
    assert harness.median_interval(values) == (6.0, 15.0)
    assert harness.median_interval(values, confidence=0.99) == (4.0, 17.0)  # P(<= 3) = 0.0013
    assert harness.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95%: the whole range

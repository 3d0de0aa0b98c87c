"""The tensor-parallel benchmark (dtrain.bench.tensor_parallel) at tiny sizes: it times both
implementations in one run, reports their ratio, both compute the same loss at every step, after updates
too, and the bytes our model sends per step equal the analytic count exactly."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch

from dtrain.bench import comm
from dtrain.bench import tensor_parallel as bench
from tests.tolerances import FP32

SIZES = {"--d-model": 32, "--n-layers": 2, "--n-heads": 4, "--seq-len": 16, "--batch": 2, "--vocab": 96}
TINY = ["--tp", "2", "--steps", "2", "--warmup", "0", *(str(x) for kv in SIZES.items() for x in kv)]


def test_ring_costs_and_the_formulas_figure():
    assert comm.ring_bytes(comm.ALL_REDUCE, 1000, 4) == 1500
    assert comm.ring_bytes(comm.ALL_GATHER, 1000, 4) == 750
    assert comm.ring_bytes(comm.REDUCE_SCATTER, 1000, 1) == 0
    cfg = bench.configs(bench.parse_args(TINY))
    a = bench.analytic_bytes(cfg, batch=2, seq_len=16)
    bsh = 2 * 16 * 32 * 4  # fp32
    assert a.formulas == 2 * 4 * bsh  # 4 all-reduces per layer, 2(n-1)/n = 1 on two ranks
    assert a.total == a.formulas + 2 * bsh + 3 * 2 * 16 * 4  # + embedding, head entry, cross-entropy


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_benchmark_reports_both_timings_ratio_same_losses_and_exact_bytes(sp, capfd, tmp_path):
    csv_path = tmp_path / "out.csv"
    summary = bench.run([*TINY, *(["--sp"] if sp else []), "--csv", str(csv_path)])
    out = capfd.readouterr().out

    # PyTorch's DTensor tensor parallelism must run: its failure fails the test.
    assert summary["errors"] == {} and set(summary["impls"]) == {"ours", "pytorch"}
    for name in ("ours", "pytorch"):
        assert summary["impls"][name]["median_s"] > 0
        assert re.search(rf"^{re.escape(bench.LABELS[name])}\s+\d+\.\d\s+\d+\.\d\s+\d+", out, re.M), out
    assert re.search(r"ratio ours / PyTorch step time: \d+\.\d{3} \(median\)", out), out
    ours, theirs = summary["impls"]["ours"], summary["impls"]["pytorch"]
    assert summary["ratio"] == pytest.approx(ours["median_s"] / theirs["median_s"])
    # Same weights, same batch every step: the same loss at all 3 steps, the last two after updates, and
    # falling (the batch is learnt).
    losses = torch.tensor(ours["losses"], dtype=torch.float64)
    assert len(losses) == 3 and losses[-1] < losses[0]
    torch.testing.assert_close(losses, torch.tensor(theirs["losses"], dtype=torch.float64), **FP32)
    # Bytes are deterministic: measured must equal the analytic count exactly.
    assert isinstance(summary["measured_bytes"], Fraction)
    assert summary["measured_bytes"] == summary["analytic_bytes"] > summary["formulas_bytes"] > 0
    assert "measured == analytic: True" in out
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("tp,sp,")

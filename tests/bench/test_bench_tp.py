"""The tensor-parallel benchmark (dtrain.bench.tensor_parallel) at tiny sizes: it times both
implementations in one run, reports their ratio, and the bytes our model sends per step equal the
analytic count exactly."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from dtrain.bench import comm
from dtrain.bench import tensor_parallel as bench

SIZES = {"--d-model": 32, "--n-layers": 2, "--n-heads": 4, "--seq-len": 16, "--batch": 2, "--vocab": 96}
TINY = ["--tp", "2", "--steps", "2", "--warmup", "0", *(str(x) for kv in SIZES.items() for x in kv)]


def test_ring_costs_and_the_formulas_figure():
    assert comm.ring_bytes(comm.ALL_REDUCE, 1000, 4) == 1500
    assert comm.ring_bytes(comm.ALL_GATHER, 1000, 4) == 750
    assert comm.ring_bytes(comm.REDUCE_SCATTER, 1000, 1) == 0
    cfg = bench.make_config(bench.parse_args(TINY), 2)
    a = bench.analytic_bytes(cfg, batch=2, seq_len=16)
    bsh = 2 * 16 * 32 * 4  # fp32
    assert a.formulas == 2 * 4 * bsh  # 4 all-reduces per layer, 2(n-1)/n = 1 on two ranks
    assert a.total == a.formulas + 2 * bsh + 3 * 2 * 16 * 4  # + embedding, head entry, cross-entropy


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_benchmark_reports_both_timings_ratio_and_exact_bytes(sp, capfd, tmp_path):
    csv_path = tmp_path / "out.csv"
    summary = bench.run([*TINY, *(["--sp"] if sp else []), "--csv", str(csv_path)])
    out = capfd.readouterr().out

    assert set(summary["impls"]) == {"ours", "pytorch"}, summary["pytorch_error"]
    for name in ("ours", "pytorch"):
        assert summary["impls"][name]["median_s"] > 0
        assert re.search(rf"^{re.escape(bench.LABELS[name])}\s+\d+\.\d\s+\d+\.\d\s+\d+", out, re.M), out
    assert re.search(r"ratio ours / PyTorch step time: \d+\.\d{3} \(median\)", out), out
    assert summary["ratio"] == pytest.approx(
        summary["impls"]["ours"]["median_s"] / summary["impls"]["pytorch"]["median_s"]
    )
    # Bytes are deterministic: measured must equal the analytic count exactly.
    assert isinstance(summary["measured_bytes"], Fraction)
    assert summary["measured_bytes"] == summary["analytic_bytes"] > summary["formulas_bytes"] > 0
    assert "measured == analytic: True" in out
    # Same weights, same batch: both implementations compute the same first loss.
    ours, torch_tp = summary["impls"]["ours"], summary["impls"]["pytorch"]
    assert ours["first_loss"] == pytest.approx(torch_tp["first_loss"], rel=1e-5)
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("tp,sp,")

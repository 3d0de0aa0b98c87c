"""The MoE benchmark (dtrain.bench.moe) at tiny sizes: both dispatchers compute the same outputs and
gradients, the bytes our all-to-all sends equal the exact count of rows leaving each rank, the all-gather
dispatcher's equal the ring cost (n-1)/n * S of its collectives, and the training run reports every
expert's load each step, summing to tokens * k."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from dtrain.bench import moe as bench
from tests.tolerances import MOE_DISPATCH_FP64

SIZES = {"--d-model": 32, "--n-layers": 2, "--n-heads": 4, "--seq-len": 16, "--micro-batch": 2, "--vocab": 96}
FAST = {"--ep": 2, "--tokens": 48, "--steps": 1, "--warmup": 0, "--train-steps": 3, "--timeout": 120}
TINY = [str(x) for kv in (*FAST.items(), *SIZES.items()) for x in kv]


def test_exact_all_to_all_count_and_the_formulas_figure():
    # 2 ranks, 4 experts (rank 0 holds 0-1, rank 1 holds 2-3): kept rows per expert of each rank.
    counts = [[3, 1, 4, 0], [2, 2, 5, 1]]
    assert bench.alltoall_rows(counts, 0, 2) == (4, 4)  # sends 4 + 0; receives 2 + 2
    assert bench.alltoall_rows(counts, 1, 2) == (4, 4)
    assert bench.alltoall_rows([[3, 1, 0, 0], [0, 0, 5, 1]], 0, 2) == (0, 0)  # all local
    terms = dict(bench.alltoall_analytic(counts, 0, d=8, itemsize=4))
    assert sum(terms.values()) == (2 - 1) * 2 * 8 + 2 * (4 + 4) * 8 * 4
    # Balanced routing, nothing dropped: each all-to-all moves (ep-1)/ep of the T*k rows, docs/formulas.md.
    ep, experts, t, k, d = 4, 8, 64, 2, 16
    even = [[t * k // experts] * experts for _ in range(ep)]
    rows = sum(v for label, v in bench.alltoall_analytic(even, 1, d, 4) if not label.startswith("count"))
    assert rows == 4 * bench.formulas_alltoall(ep, t, k, d, 4) == 4 * Fraction(3, 4) * t * k * d * 4
    ag = dict(bench.allgather_analytic(2, t, k, d, 4, 4))
    assert ag["tokens fwd: all-gather of ep*T*d"] == Fraction(1, 2) * 2 * t * d * 4


def test_benchmark_dispatchers_agree_bytes_are_exact_and_load_is_reported(capfd, tmp_path):
    csv_path, load_csv = tmp_path / "out.csv", tmp_path / "load.csv"
    summary = bench.run([*TINY, "--dtype", "float64", "--csv", str(csv_path), "--load-csv", str(load_csv)])
    out = capfd.readouterr().out
    c = summary["config"]

    # Same routing and experts: outputs and every gradient agree (float64, to rounding; bitwise here).
    assert set(summary["diffs"]) >= {"out", "x", "router.weight", "experts.w1", "experts.w2", "experts.w3"}
    for name, (diff, scale) in summary["diffs"].items():
        assert scale > 0 and diff <= MOE_DISPATCH_FP64 * scale, (name, diff, scale)
    a2a, ag = summary["impls"]["alltoall"], summary["impls"]["allgather"]
    assert len(a2a["losses"]) == len(ag["losses"]) == 2  # the counting step and the timed one
    assert a2a["losses"] == pytest.approx(ag["losses"], rel=MOE_DISPATCH_FP64, abs=0)

    d, itemsize, k = c["d_model"], summary["itemsize"], c["top_k"]
    counts = summary["counts"]
    assert sum(map(sum, counts)) == summary["kept_slots"] <= summary["routed_slots"] == 2 * 48 * k
    for rank in range(2):
        # all-to-all: measured == rows actually leaving the rank * d * bytes (4 all-to-alls) + counts.
        r = a2a["ranks"][rank]
        leaving, arriving = bench.alltoall_rows(counts, rank, c["experts"] // 2)
        exact = 2 * (leaving + arriving) * d * itemsize + (2 - 1) * (c["experts"] // 2) * 8
        assert isinstance(r["measured_bytes"], Fraction)
        assert r["measured_bytes"] == r["analytic_bytes"] == exact
        assert r["row_bytes"] / summary["formulas_step"] == r["over_formulas"] > 0
        # all-gather: every collective costs (n-1)/n * S, S its gathered size.
        g = ag["ranks"][rank]
        act, slots = 2 * 48 * d * itemsize, 2 * 48 * k
        want = Fraction(1, 2) * (4 * act + slots * 8 + 2 * slots * itemsize)
        assert g["measured_bytes"] == g["analytic_bytes"] == want
        assert r["median_s"] > 0 and g["median_s"] > 0
    assert summary["bytes_match"]
    assert re.search(r"ratio all-to-all / all-gather step time: \d+\.\d{3}", out), out
    assert "== analytic: True" in out and "== analytic: False" not in out

    load = summary["load"]
    assert load["steps"] == 3 and load["layers"] == [0, 1] and load["picks"] == [1, 2, 3]
    assert [(r["step"], r["layer"]) for r in load["rows"]] == [(s, i) for s in (1, 2, 3) for i in (0, 1)]
    tokens = 2 * c["micro_batch"] * c["seq_len"]
    for v in load["rows"]:
        assert len(v["counts"]) == c["experts"] and sum(v["counts"]) == tokens * k
        assert 0 <= v["dropped_frac"] < 1 and v["max_over_mean"] >= 1 >= v["min_over_mean"]
    assert load["sums_match"]
    assert re.search(rf"tokens per expert sum to tokens\*k = {tokens * k} every step: True", out), out
    assert len(csv_path.read_text().splitlines()) == 1 + 2 * 2
    rows = load_csv.read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 and rows[0].startswith("step,layer,loss,step_s,max_over_mean,")
    assert rows[0].endswith(",expert7") and rows[1].startswith("1,0,")


def test_a_world_of_one_rank_is_refused():
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--ep", "1"])
    assert exc.value.code == 2

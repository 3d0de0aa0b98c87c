"""The Gloo collectives benchmark (dtrain.bench.collectives) at a tiny size: every form of each
collective runs, gives the same sums and gathered parameters on every rank, and is in the table."""

from __future__ import annotations

import pytest

from dtrain.bench import collectives as bench


def test_every_form_runs_agrees_and_is_reported(capfd):
    summary = bench.run(["--mib", "1", "--steps", "1", "--warmup", "0", "--timeout", "120"])
    assert summary["agree"] and summary["ranks"] == 2 and summary["bytes"] == 2**20
    assert set(summary["median_ms"]) == set(bench.FORMS) and all(t > 0 for t in summary["median_ms"].values())
    out = capfd.readouterr().out
    assert all(name in out for name in bench.FORMS)
    assert "every form gave the same sums and parameters" in out


@pytest.mark.parametrize("argv", [["--ranks", "1"], ["--mib", "0"], ["--steps", "0"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2

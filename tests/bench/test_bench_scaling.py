"""The scaling benchmark (`dtrain bench`, dtrain.bench.scaling) at a tiny size: a strong-scaling sweep of dp
and ZeRO-1 over worlds 1 and 2 writes its CSV, plots and TensorBoard scalars; bytes sent are zero on one
rank and the ring all-reduce of the gradients on two; bytes held follow Trainer.held_bytes (DDP replicates,
ZeRO-1 halves the optimizer states at dp 2); the layouts parse and bad ones fail in one line."""

from __future__ import annotations

import csv
import importlib.util
import os
from types import SimpleNamespace

import pytest

from dtrain.bench import scaling
from dtrain.bench.scaling import COLUMNS, FIGURES
from dtrain.cli import main as dtrain_main
from dtrain.config import ConfigError
from tests.harness import repo_root

TINY = os.path.join(repo_root(), "configs", "tiny.yaml")
SMALL = ["train.seq_len=32", "model.max_seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2"]


def _args(**kw) -> SimpleNamespace:
    base = dict(config=TINY, overrides=SMALL, worlds="1,2,4", layouts="dp", mode="both", steps=1, warmup=0,
                global_batch=None, rank_batch=None, threads=1)  # fmt: skip
    return SimpleNamespace(**(base | kw))


def test_layouts_parse_and_plan_without_processes():
    assert scaling.parse_layout("dp") == scaling.Layout("dp")
    assert scaling.parse_layout("tp2+sp+zero1") == scaling.Layout("tp2+sp+zero1", tp=2, sp=True, zero=1)
    assert scaling.parse_layout("dp+ep2").overrides(4, 0)[-1] == "model.moe.num_experts=4"
    assert scaling.parse_layout("ep8").overrides(8, 0)[-1] == "model.moe.num_experts=8"
    for bad in ("foo", "tp2+tp2", "sp", "zero4", "tp0"):
        with pytest.raises(ConfigError, match="--layouts"):
            scaling.parse_layout(bad)
    points, notes = scaling.plan(_args(layouts="dp,pp2", rank_batch=4))
    got = {(p.mode, p.layout.name, p.world): p.global_batch for p in points}
    assert got == {
        ("strong", "dp", 1): 8, ("strong", "dp", 2): 8, ("strong", "dp", 4): 8,
        ("weak", "dp", 1): 4, ("weak", "dp", 2): 8, ("weak", "dp", 4): 16,  # rank batch x dp
        ("strong", "pp2", 2): 8, ("strong", "pp2", 4): 8, ("weak", "pp2", 2): 4, ("weak", "pp2", 4): 8,
    }  # fmt: skip
    assert notes == ["pp2 skipped at world 1: tp*pp=2 does not divide it"]
    assert {p.cfg.parallel.dp for p in points if p.layout.name == "pp2"} == {1, 2}
    with pytest.raises(ConfigError, match=r"^pp2 at world 4 \(strong scaling\): parallel.pp_schedule=1f1b"):
        scaling.plan(_args(layouts="pp2", global_batch=4))


def test_cli_help_and_bad_input_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        dtrain_main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--worlds", "--layouts", "--mode", "--steps", "--warmup", "--global-batch", "--rank-batch",
                 "--out", "--threads", "--timeout"):  # fmt: skip
        assert flag in out, flag
    for argv, message in [
        (["--layouts", "dp,tp3"], "dtrain: error: --layouts tp3 fits none of --worlds 1,2,4"),
        (["--layouts", "tp2+foo"], "dtrain: error: --layouts: 'tp2+foo' has an unknown part 'foo'"),
        (["parallel.zero=1"], "dtrain: error: parallel.zero=1: the layout sets parallel.zero"),
    ]:
        with pytest.raises(SystemExit) as e:
            dtrain_main(["bench", TINY, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.slow  # four spawned worlds; the bytes it checks are held to the prediction by test_ledger.py
def test_sweep_writes_csv_plots_tensorboard_with_bytes_sent_and_held(tmp_path, capfd):
    out = str(tmp_path / "bench")
    argv = [TINY, *SMALL, "--worlds", "1,2", "--layouts", "dp,zero1", "--mode", "strong", "--steps", "1"]
    assert scaling.main([*argv, "--warmup", "0", "--threads", "1", "--out", out]) == 0
    assert "strong dp " in capfd.readouterr().out

    with open(os.path.join(out, "scaling.csv")) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = {(r["layout"], int(r["world"])): r for r in reader}
    assert set(rows) == {("dp", 1), ("dp", 2), ("zero1", 1), ("zero1", 2)}

    def num(layout, world, column):
        return float(rows[layout, world][column])

    psi = int(rows["dp", 1]["n_params"])
    for key, r in rows.items():
        assert float(r["tokens_per_s"]) > 0 and float(r["peak_mem_bytes"]) > 0, key
        assert float(r["first_loss"]) == pytest.approx(num("dp", 1, "first_loss"), rel=1e-5), key
        assert num(*key, "efficiency") == pytest.approx(num(*key, "speedup") / key[1])
    # One rank sends nothing; two all-reduce the fp32 gradients: 2(n-1)/n * 4 psi = 4 psi bytes, plus the
    # few scalars of the loss and the gradient norm.
    assert num("dp", 1, "sent_bytes_mean") == num("zero1", 1, "sent_bytes_mean") == 0
    for key in rows:  # the ledger's count is dtrain.analysis.comm_volume's prediction, exactly
        assert num(*key, "sent_bytes_mean") == num(*key, "sent_predicted_bytes"), key
    assert 4 * psi <= num("dp", 2, "sent_bytes_mean") <= 4 * psi + 64
    assert 4 * psi <= num("zero1", 2, "sent_bytes_mean") <= 4 * psi + 64 + 8 * 2  # buckets padded to even
    # Held bytes are Trainer.held_bytes(): DDP replicates 4 + 4 + 8 bytes per parameter at any dp; ZeRO-1
    # shards the 8 bytes of Adam moments, so dp 2 holds about half of dp 1's optimizer bytes.
    assert (
        num("dp", 1, "held_total_bytes") == num("dp", 2, "held_total_bytes") == pytest.approx(16 * psi, 0.01)
    )
    assert num("zero1", 1, "held_optimizer_bytes") == num("dp", 1, "held_optimizer_bytes")
    ratio = num("zero1", 2, "held_optimizer_bytes") / num("zero1", 1, "held_optimizer_bytes")
    assert 0.5 <= ratio <= 0.51

    if importlib.util.find_spec("matplotlib") is not None:
        for name in FIGURES:
            assert os.path.getsize(os.path.join(out, name)) > 1000, name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(out)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {
        "strong/tokens_per_s/dp",
        "strong/sent_mib_per_step/zero1",
        "strong/model_states_mib/zero1",
    } <= set(tags)
    assert [e.step for e in events.Scalars("strong/efficiency/dp")] == [1, 2]

"""`dtrain schedule` and dtrain.analysis.timeline: timelines drawn from the schedule data (PNG and SVG), the
executor's per-action timings, and a measured timeline from a real 2-rank pipeline run."""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest
import torch

from dtrain.analysis import timeline
from parallel import pipeline_schedules as ps
from tests import harness
from tests.harness import main_in_process, repo_root, run_python

ROOT = repo_root()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return run_python("-m", "dtrain", "schedule", *args, timeout=timeout)


def assert_png(path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE
    assert os.path.getsize(path) > 1000


# --- from the schedule data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pp", "m", "v"), [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2)]
)
def test_draw_from_simulation_writes_png_and_svg(name, pp, m, v, tmp_path):
    tl = timeline.from_simulation(name, pp, m, v)
    assert len(tl) == 2 * m * pp * v
    assert timeline.bubble_fraction(tl, pp) == pytest.approx(
        ps.simulate(ps.build(name, pp, m, v), pp)["bubble"]
    )
    assert timeline.bubble_fraction(tl, pp) == pytest.approx(timeline.formula_bubble(name, pp, m, v))
    png, svg = tmp_path / f"{name}.png", tmp_path / "sub" / f"{name}.svg"
    assert timeline.draw(tl, pp, str(png), f"{name} pp={pp}") == str(png)
    timeline.draw_simulation(name, pp, m, v, str(svg))
    assert_png(png)
    text = svg.read_text()
    assert "<svg" in text
    assert "bubble" in text  # the title, kept as text in the SVG


def test_draw_refuses_other_formats(tmp_path):
    with pytest.raises(timeline.TimelineError, match=r"\.png or \.svg"):
        timeline.draw(timeline.from_simulation("1f1b", 2, 2), 2, str(tmp_path / "x.pdf"), "t")
    assert not (tmp_path / "x.pdf").exists()


# --- the executor's record ------------------------------------------------------------------------------


def executor_records() -> dict:
    from dtrain.trainer import Trainer
    from tests.reference import tiny_config

    trainer = Trainer(
        tiny_config(2, "parallel.pp=2", "model.n_layers=2"), harness.grid(pp=2, dp=1), torch.device("cpu")
    )
    executor, actions = trainer.model.executor, trainer.model.train_actions
    microbatches = trainer._microbatches(trainer.train_data, 0)

    def run(**record):
        # As Trainer.train_step: gradients are reduced (and become final) in each chunk's last backward.
        loss = executor.run(
            actions,
            microbatches,
            loss_scale=1 / trainer.global_tokens,
            before_backward=lambda chunk, is_last: trainer.grad_sync.before_backward(is_last),
            **record,
        )
        trainer.grad_sync.finish_grad_sync()
        grads = [p.grad.clone() for p in trainer.params]
        trainer.grad_sync.zero_grad()
        return loss, grads

    rec: list = []
    plain, plain_grads = run()
    recorded, recorded_grads = run(record=rec)
    return {
        "actions": [str(a) for a in actions],
        "recorded": [(str(a), start, end) for a, start, end in rec],
        "same_loss": bool(torch.equal(plain, recorded)),
        "same_grads": all(torch.equal(a, b) for a, b in zip(plain_grads, recorded_grads, strict=True)),
    }


def test_executor_records_one_entry_per_action(world2):
    for result in world2.run(executor_records):
        assert [a for a, _, _ in result["recorded"]] == result["actions"]
        times = [(start, end) for _, start, end in result["recorded"]]
        assert all(start <= end for start, end in times)
        # One rank runs its actions in order: each starts after the previous one ended.
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(times))
        assert result["same_loss"] and result["same_grads"]  # recording changes nothing computed


# --- the command line -----------------------------------------------------------------------------------


def test_cli_draws_schedule_and_prints_bubble(tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "rank 3: F3.0 B3.0 F3.1" in result.stdout  # pipeline_schedules.render
    assert "simulated bubble: 27.3% of the step" in result.stdout
    assert "(p-1)/(m+p-1) = 3/11 = 27.3%" in result.stdout
    assert_png(out)

    result = run_cli("--schedule", "interleaved", "--pp", "4", "--microbatches", "8", "--virtual", "2")
    assert result.returncode == 0, result.stderr
    assert "18.8% over the ideal time (docs/formulas.md: (p-1)/(v*m) = 3/16 = 18.8%" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pp", "4", "--microbatches", "8", "--out", "x.pdf"], "the timeline is drawn as .png or .svg"),
        (["--schedule", "1f1b", "--pp", "4", "--microbatches", "2"], "1f1b needs at least pp=4"),
        (["--schedule", "gpipe", "--pp", "2", "--microbatches", "2", "--virtual", "2"], "interleaved only"),
    ],
)
def test_cli_schedule_errors_in_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written there
    code, out, err = main_in_process(capsys, "schedule", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


TINY_PP2 = """\
model: {vocab_size: 96, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 32}
parallel: {pp: 2, dp: 1}
train: {steps: 2, seq_len: 16, global_batch_size: 16, micro_batch_size: 4}
data: {kind: synthetic}
run: {out_dir: OUT_DIR}
"""


@pytest.mark.slow
def test_cli_measures_a_real_pipeline_step(tmp_path):
    config = tmp_path / "pp2.yaml"
    run_dir = tmp_path / "run"
    config.write_text(TINY_PP2.replace("OUT_DIR", str(run_dir)))
    out = tmp_path / "measured.png"
    result = run_cli("--measure", str(config), "train.seq_len=8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert_png(out)
    assert "measured bubble:" in result.stdout
    assert "rank 0: busy" in result.stdout and "rank 1: busy" in result.stdout

    # The saved timings: every action of the 1F1B schedule on both stages, within each rank's step.
    tl = timeline.load_measured(str(run_dir))
    m = 4
    expected = sorted(str(a) for actions in ps.build("1f1b", 2, m) for a in actions)
    assert sorted(str(a) for _, a, _, _ in tl) == expected
    assert all(a.chunk == rank and 0 <= start <= end for rank, a, start, end in tl)
    svg = tmp_path / "again.svg"
    timeline.draw_measured(str(run_dir), str(svg))
    assert "<svg" in svg.read_text()

"""The command line end to end, in real subprocesses: bad configs fail in one line before any process
group exists; real torchrun with 1 and 2 ranks logs the same losses; metrics.jsonl and TensorBoard files
are written; prepare-data feeds a memmap run; export loads into the single-process model; every
subcommand takes its options and overrides in any order, and usage errors are one line."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from dtrain.model import Transformer
from tests.harness import main_in_process, repo_root, run_python

ROOT = repo_root()
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python(*args, timeout=timeout)


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_heads=3", "dtrain: error: model.n_heads=3 must divide model.d_model=64"),
        ("train.lrr=1", "dtrain: error: unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("train.steps=ten", "dtrain: error: train.steps='ten' has the wrong type (expected int)"),
        ("data.kind=memmap", "dtrain: error: data.kind=memmap needs data.path"),
        ("parallel.dp=3", "dtrain: error: parallel.dp*tp*pp*cp=3 does not match the world size 1"),
        ("parallel.tp=2", "dtrain: error: world size 1 is not divisible by tp*pp*cp=2"),
        ("model.moe.num_experts=-1", "dtrain: error: model.moe.num_experts=-1 must be >= 0 (0 = dense MLP)"),
    ],
)
def test_bad_config_fails_in_one_line(override, message, tmp_path):
    result = run("-m", "dtrain", "train", TINY, override, f"run.out_dir={tmp_path}/run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line, no traceback
    assert result.stderr.startswith(message)
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_torchrun_one_and_two_ranks_log_the_same_losses(tmp_path):
    logs = {}
    for nproc in (2, 1):
        out = tmp_path / f"n{nproc}"
        result = run(
            "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "dtrain", "train", TINY, "train.steps=20", "train.eval_every=10", f"run.out_dir={out}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        logs[nproc] = read_metrics(out)
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
        assert os.path.isdir(out / "checkpoints" / "step_20")
    two, one = logs[2], logs[1]
    assert [r["step"] for r in two] == list(range(1, 21))
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s"):
        assert key in two[0], key
    assert len(two[-1]["peak_mem_mb"]) == 2 and len(one[-1]["peak_mem_mb"]) == 1
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=0.0
    )
    assert two[-1]["loss"] < two[0]["loss"] - 1.0  # clearly learning
    assert "val_loss" in two[9] and math.isclose(
        two[9]["val_ppl"], math.exp(two[9]["val_loss"]), rel_tol=1e-9
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "n2")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "grad_norm", "tokens_per_s", "val/loss", "peak_mem_mb/rank1"} <= tags, tags
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [round(r["loss"], 4) for r in two]

    exported = tmp_path / "model.pt"
    result = run(
        "-m", "dtrain", "export", str(tmp_path / "n2" / "checkpoints" / "step_20"), "--out", str(exported)
    )
    assert result.returncode == 0, result.stderr
    from dtrain.config import load_config

    cfg = load_config(TINY)
    model = Transformer(cfg.model)
    model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    saved = torch.load(tmp_path / "n2" / "checkpoints" / "step_20" / "model_pp0.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name])


def test_prepare_data_then_train_on_memmap(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    result = run("-m", "dtrain", "prepare-data", str(text), "--out", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "training" in result.stdout and (tmp_path / "data" / "val.npy").exists()
    out = tmp_path / "run"
    result = run(
        "-m", "dtrain", "train", TINY, "data.kind=memmap", f"data.path={tmp_path / 'data'}",
        "train.steps=30", "train.eval_every=30", f"run.out_dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert "val_loss" in records[-1]


def test_memmap_token_beyond_vocab_is_refused(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("é" * 3000)  # UTF-8 bytes 0xC3 0xA9: ids 195 and 169
    assert main_in_process(capsys, "prepare-data", str(text), "--out", str(tmp_path / "data"))[0] == 0
    code, _, err = main_in_process(
        capsys, "train", TINY, "data.kind=memmap", f"data.path={tmp_path / 'data'}", "model.vocab_size=128",
        f"run.out_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "model.vocab_size=128" in err, err
    assert not (tmp_path / "run").exists()


# --- argument order -----------------------------------------------------------------------------------


GPU_1B = os.path.join(ROOT, "configs", "gpu_1b.yaml")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["estimate", "C", "--world", "8", "parallel.zero=1"],
            {"world": 8, "overrides": ["parallel.zero=1"]},
        ),
        (
            ["estimate", "--memory", "80GiB", "C", "train.seq_len=512", "--world", "4", "parallel.zero=2"],
            {
                "config": "C",
                "memory": "80GiB",
                "world": 4,
                "overrides": ["train.seq_len=512", "parallel.zero=2"],
            },
        ),
        (["train", "C", "a.b=1", "c.d=2"], {"config": "C", "overrides": ["a.b=1", "c.d=2"]}),
        (
            ["schedule", "--measure", "C", "train.steps=1", "--out", "t.png", "parallel.pp=2"],
            {"measure": "C", "out": "t.png", "overrides": ["train.steps=1", "parallel.pp=2"]},
        ),
        (["schedule", "--pp", "2", "--microbatches", "4"], {"pp": 2, "microbatches": 4, "overrides": []}),
        (
            ["bench", "C", "model.d_model=32", "--worlds", "1,2", "train.seq_len=16", "--mode", "strong"],
            {
                "config": "C",
                "worlds": "1,2",
                "mode": "strong",
                "overrides": ["model.d_model=32", "train.seq_len=16"],
            },
        ),
        (["export", "--out", "m.pt", "ckpt"], {"checkpoint": "ckpt", "out": "m.pt"}),
        (["export", "ckpt", "--out", "m.pt"], {"checkpoint": "ckpt", "out": "m.pt"}),
        (
            ["prepare-data", "--out", "d", "corpus.txt", "--dtype", "uint32"],
            {"text": "corpus.txt", "out": "d"},
        ),
    ],
)
def test_options_and_overrides_in_any_order(argv, expected):
    from dtrain.cli import parser

    args = vars(parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


def test_usage_errors_are_one_line(capsys):
    from dtrain.cli import main

    for argv, message in [
        (["estimate", "C", "parallel.zero=1", "--wrld", "8"], "unrecognized arguments: --wrld 8"),
        (["schedule", "--pp", "2", "--out"], "argument --out: expected one argument"),
        (["trian", "C"], "argument command: invalid choice: 'trian'"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"dtrain: error: {message}"), err


def test_estimate_with_options_after_the_overrides(capsys):
    """The README's form: CONFIG, then overrides and options in any order."""
    code, out, err = main_in_process(capsys, "estimate", GPU_1B, "--world", "8", "parallel.zero=1")
    assert code == 0, err
    assert "world 8 = dp 8" in out and "ZeRO-1" in out


# --- estimate --memory --------------------------------------------------------------------------------


def test_memory_without_a_unit_is_refused(capsys):
    code, out, err = main_in_process(capsys, "estimate", GPU_1B, "--world", "8", "--memory", "80")
    assert code == 2 and out == ""
    assert err == (
        "dtrain: error: --memory=80 has no unit; write it with a unit, like 80GiB, 40GB or 512MiB (B, KB, "
        "MB, GB, TB, KiB, MiB, GiB, TiB)\n"
    )


def test_parse_bytes_forms():
    from dtrain.analysis.suggest import parse_bytes
    from dtrain.config import ConfigError

    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("40 GB") == 40 * 10**9
    assert parse_bytes("512mib") == 512 * 2**20 and parse_bytes("1.5TiB") == int(1.5 * 2**40)
    for bad, why in [
        ("8e9", "has no unit"),
        ("80G", "is not a size"),
        ("lots", "is not a size"),
        ("0GiB", "more"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_bytes(bad)


def _suggestions(stdout: str) -> list[tuple[str, list[str]]]:
    """(figure, overrides) of every listed layout: lines '  <figure> <unit>  key=value ...'."""
    out = []
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) > 2 and all("=" in p for p in parts[2:]):
            out.append((f"{parts[0]} {parts[1]}", parts[2:]))
    return out


@pytest.mark.parametrize(
    "given", [[], pytest.param(["train.micro_batch_size=4", "parallel.zero=3"], marks=pytest.mark.slow)]
)
def test_pasted_suggestion_reproduces_its_figure(given):
    """gpu_1b.yaml turns activation checkpointing on; the first layout that fits 80 GiB turns it off, so a
    suggestion that left the key out would give another figure when pasted."""
    from dtrain.analysis.estimate import default_world, estimate_model_states
    from dtrain.analysis.suggest import human, peak_device_bytes
    from dtrain.config import load_config

    result = run("-m", "dtrain", "estimate", GPU_1B, *given, "--world", "8", "--memory", "80GiB")
    assert result.returncode == 0, result.stderr
    listed = _suggestions(result.stdout)
    assert len(listed) == 8
    header = [line for line in result.stdout.splitlines() if line.startswith("layouts of 8 ranks that fit")]
    total = int(header[0].split(": ")[1].split(";")[0])
    assert f"the first 8 are shown, {total - 8} more fit" in header[0]
    assert "Listed fastest first by expected cost" in result.stdout
    figure, overrides = listed[0]
    assert "train.activation_checkpointing=false" in overrides  # varied, so printed even where it is off
    keys = [o.partition("=")[0] for o in overrides]
    assert len(set(keys)) == len(keys)  # the given overrides the layout replaces are left out
    assert all(o in overrides for o in given if not o.startswith("parallel."))
    pasted = run("-m", "dtrain", "estimate", GPU_1B, *overrides)  # the world follows from parallel.dp etc.
    assert pasted.returncode == 0, pasted.stderr
    assert "world 8" in pasted.stdout and f"~ {figure}" in pasted.stdout, (figure, pasted.stdout)
    for figure, overrides in listed:  # every line, through the API
        cfg = load_config(GPU_1B, overrides)
        est = estimate_model_states(cfg, default_world(cfg))
        assert human(max(peak_device_bytes(s) for s in est["stages"])) == figure, overrides


# --- output folders -----------------------------------------------------------------------------------


def test_rerun_into_the_same_folder_loses_nothing(tmp_path):
    """Rerunning a job used to truncate its metrics.jsonl and leave its later checkpoints beside the new
    ones. Now a fresh run into the folder refuses; run.overwrite=true moves the old outputs aside; a
    resume of the finished run says there is nothing to do."""
    out = tmp_path / "run"
    job = ("-m", "dtrain", "train", TINY, "run.ckpt_every=2", "train.eval_every=0", f"run.out_dir={out}")
    first = run(*job, "train.steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    old_metrics = (out / "metrics.jsonl").read_text()

    again = run(*job, "train.steps=2")
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith(f"dtrain: error: run.out_dir={out} already holds an earlier run's")
    assert again.stderr.count("\n") == 1 and (out / "metrics.jsonl").read_text() == old_metrics

    done = run(*job, "train.steps=4", "run.resume=true")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"dtrain: nothing to do: {out}/checkpoints/step_4 is at step 4 and train.steps=4, so this run is "
        f"complete (raise train.steps to train further)\n"
    )

    fresh = run(*job, "train.steps=2", "run.overwrite=true")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (aside,) = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert f"moved the earlier run's outputs to {aside}" in fresh.stdout
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert sorted(os.listdir(aside / "checkpoints")) == ["step_2", "step_4"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2"]  # no step_4 of the old run beside it
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_estimate_json_is_one_object_with_the_reports_figures(capsys):
    from dtrain.analysis.estimate import estimate_model_states, peak_device_bytes
    from dtrain.config import load_config

    overrides, tiny = ["parallel.pp=2", "parallel.zero=1"], os.path.join(ROOT, "configs", "tiny.yaml")
    code, out, err = main_in_process(capsys, "estimate", tiny, *overrides, "--world", "4", "--json")
    assert code == 0, err
    figures = json.loads(out)  # the whole of stdout: one object
    est = estimate_model_states(load_config(tiny, overrides), 4)
    assert figures["world"] == 4 and figures["parameters"] > 0
    assert [s["stage"] for s in figures["stages"]] == [0, 1]
    for ours, stage in zip(figures["stages"], est["stages"], strict=True):
        assert ours["device"] == {**stage["device"], "activations": stage["activations"]["total"],
                                  "peak": peak_device_bytes(stage)}  # fmt: skip
        assert ours["host"] == stage["host"]
        assert ours["sent"] == {
            k.replace(" ", "/"): v for k, v in stage["communication"]["by_axis_op"].items()
        }
        assert ours["sent"]["dp/reduce-scatter"] > 0  # ZeRO-1 reduce-scatters its gradients over dp
    code, out, err = main_in_process(capsys, "estimate", tiny, "--json", "--memory", "8GiB")
    assert code == 2 and err.strip().count("\n") == 0 and "--json" in err

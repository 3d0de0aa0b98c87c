"""The launcher's argument handling: what it hands torchrun, and how it refuses a bad config (one short
`python -m launch` that fails before torch is imported); and how a worker's one-line error ends a failed
launch, under `python -m launch` and raw torchrun (one rank each, failing at start-up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.config import ConfigError
from launch import build_torchrun_argv
from tests import harness
from tests.harness import run_python

ROOT = Path(harness.repo_root())


@pytest.fixture
def cfg(tmp_path):
    """A minimal config file with `parallel` set as given (dp=2 unless told otherwise)."""

    def make(**parallel) -> str:
        parallel = {"dp": 2, **parallel}
        path = tmp_path / "run.yaml"
        items = ", ".join(f"{k}: {v}" for k, v in parallel.items())
        path.write_text(f"parallel: {{{items}}}\ntrain: {{global_batch_size: 16, micro_batch_size: 2}}\n")
        return str(path)

    return make


def test_nproc_from_config_and_standalone(cfg):
    path = cfg()
    argv = build_torchrun_argv([path, "train.steps=5", "run.out_dir=/tmp/x"])
    assert argv == [
        "--nproc-per-node", "2", "--standalone",
        "--module", "dtrain", "train", path, "train.steps=5", "run.out_dir=/tmp/x",
    ]  # fmt: skip


def test_overrides_change_the_world(cfg):
    argv = build_torchrun_argv([cfg(), "parallel.dp=4"])
    assert argv[:3] == ["--nproc-per-node", "4", "--standalone"]
    assert argv[-1] == "parallel.dp=4"


@pytest.mark.parametrize(
    "opts",
    [
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job1"],
        ["--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400"],
        ["--master-addr", "127.0.0.1", "--master-port=29600"],
        ["--standalone"],
    ],
)
def test_rendezvous_options_pass_through_without_standalone(cfg, opts):
    path = cfg()
    argv = build_torchrun_argv([*opts, path])
    assert argv == [*opts, "--nproc-per-node", "2", "--module", "dtrain", "train", path]


def test_other_options_pass_through_in_both_forms(cfg):
    path = cfg()
    opts = ["--max-restarts", "3", "--max_restarts=3", "--log-dir", "/tmp/logs", "-r", "3", "-t3"]
    argv = build_torchrun_argv([*opts, path])
    assert argv == [*opts, "--nproc-per-node", "2", "--standalone", "--module", "dtrain", "train", path]


def test_torchrun_options_after_config(cfg):
    """Options may follow CONFIG and the overrides; they go to torchrun, ahead of the program."""
    path = cfg()
    argv = build_torchrun_argv(
        [path, "train.steps=5", "--nproc-per-node", "2", "--max_restarts=1", "train.lr=0.01"]
    )
    assert argv == [
        "--nproc-per-node", "2", "--max_restarts=1", "--standalone",
        "--module", "dtrain", "train", path, "train.steps=5", "train.lr=0.01",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="does not match the world size 3"):
        build_torchrun_argv([path, "--nproc-per-node=3"])
    with pytest.raises(ConfigError, match="torchrun option --log-dir needs a value"):
        build_torchrun_argv([path, "--log-dir"])


@pytest.mark.parametrize("form", [["--nproc-per-node", "2"], ["--nproc_per_node=2"]])
def test_given_nproc_is_kept_and_checked(cfg, form):
    path = cfg()
    assert build_torchrun_argv([*form, path]) == [*form, "--standalone", "--module", "dtrain", "train", path]
    bad = [form[0], "3"] if len(form) == 2 else ["--nproc_per_node=3"]
    with pytest.raises(ConfigError, match="does not match the world size 3"):
        build_torchrun_argv([*bad, path])


def test_nnodes_divides_the_world(cfg):
    path = cfg(dp=8)
    rdzv = ["--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=7"]
    argv = build_torchrun_argv(["--nnodes", "2", *rdzv, path])
    assert argv == ["--nnodes", "2", *rdzv, "--nproc-per-node", "4", "--module", "dtrain", "train", path]
    assert "--standalone" not in build_torchrun_argv(["--nnodes=2", "--node-rank=1", path])
    with pytest.raises(ConfigError, match="not divisible by --nnodes=3"):
        build_torchrun_argv(["--nnodes=3", *rdzv, path])
    with pytest.raises(ConfigError, match="fixed node count"):
        build_torchrun_argv(["--nnodes=1:4", *rdzv, path])


def test_dp_fill_without_cuda_needs_a_count(cfg, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = cfg(dp=-1)
    with pytest.raises(ConfigError, match=r"parallel.dp=N or pass --nproc-per-node N"):
        build_torchrun_argv([path])
    # an explicit count fills dp instead
    assert build_torchrun_argv(["--nproc-per-node=2", path])[:2] == ["--nproc-per-node=2", "--standalone"]


def test_dp_fill_uses_nproc_per_node_from_config(cfg, tmp_path):
    path = tmp_path / "fill.yaml"
    path.write_text("parallel: {dp: -1}\ndist: {nproc_per_node: 2}\n")
    assert build_torchrun_argv([str(path)])[:3] == ["--nproc-per-node", "2", "--standalone"]
    # the default job is one of these, so `python -m launch configs/tiny.yaml` needs no count
    assert build_torchrun_argv([str(ROOT / "configs" / "tiny.yaml")])[:2] == ["--nproc-per-node", "2"]


def test_dp_fill_counts_gpus(cfg, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    path = cfg(dp=-1)
    argv = build_torchrun_argv(["--nnodes=2", "--rdzv-endpoint=node0:29400", path])
    assert argv[:3] == ["--nnodes=2", "--rdzv-endpoint=node0:29400", "--nproc-per-node"]
    assert argv[3] == "4"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nnodes"], "needs a value"),
        (["--standalone"], "no CONFIG given"),
        (["-m", "x.yaml"], "set by the launcher"),
        (["--nproc-per-node=gpu", "x.yaml"], "must be a positive number"),
        (["missing.yaml"], "does not exist"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        build_torchrun_argv(argv)


def test_bad_config_exits_2_with_one_line(cfg):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "launch", cfg(), "model.n_heads=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: model.n_heads=3"), out.stderr
    assert out.stdout == ""


def _bad_data(tmp_path) -> tuple[list[str], str]:
    """Overrides that pass the launcher's config check but fail in the worker's data check, and its line."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "train.npy", np.zeros(4096, dtype=np.float32))
    line = f"dtrain: error: data file '{data}/train.npy' has dtype float32; token files must be uint16/uint32"
    return ["data.kind=memmap", f"data.path={data}", f"run.out_dir={tmp_path / 'run'}"], line


def test_worker_error_ends_a_failed_launch(tmp_path):
    """The worker's one line is the last thing `python -m launch` prints, and its status the exit status
    (not torchrun's ~35-line failure report)."""
    overrides, line = _bad_data(tmp_path)
    config = str(ROOT / "configs" / "tiny.yaml")
    out = run_python("-m", "launch", config, *overrides, "--nproc-per-node", "1", timeout=180)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == line, out.stderr
    assert "Traceback" not in out.stderr and "FAILED" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_raw_torchrun_reports_the_worker_error_as_root_cause(tmp_path):
    """Raw torchrun prints its own traceback and report, which dtrain cannot change; the worker's error
    file makes the report's root cause the dtrain line instead of 'To enable traceback see ...'."""
    overrides, line = _bad_data(tmp_path)
    config = str(ROOT / "configs" / "tiny.yaml")
    out = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "dtrain", "train", config, *overrides, timeout=180,
    )  # fmt: skip
    assert out.returncode != 0
    root = out.stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {line}" in root, out.stderr
    assert "To enable traceback" not in out.stderr

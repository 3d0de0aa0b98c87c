"""Rank failures under real torchrun: a worker killed mid-step or while it writes a checkpoint is restarted
by torchrun (--max-restarts), resumes from the last complete checkpoint (run.resume=true) and ends with
exactly the parameters, optimizer state and logged losses of an uninterrupted run; a stalled rank makes the
others stop after dist.timeout_s with one line naming the collective. Faults are injected by
tests/fault_inject.py, which wraps the ordinary command line."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from dtrain import checkpoint
from dtrain.runtime import NO_SHARED_STORE
from tests.harness import repo_root, run_python

TINY = os.path.join(repo_root(), "configs", "tiny.yaml")
# Compared exactly between runs; step_time_s, tokens_per_s and peak_mem_mb are measurements.
LOGGED = ("step", "loss", "grad_norm", "lr", "tokens", "val_loss")


def torchrun(nproc: int, faults: list[str], *train_args: str, restarts: int = 0, timeout: int = 300):
    fault_args = [a for f in faults for a in ("--fault", f)]
    return run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "--max-restarts", str(restarts), "--monitor-interval", "0.1",
        "-m", "tests.fault_inject", *fault_args, "--", "train", TINY, *train_args,
        timeout=timeout, env={NO_SHARED_STORE: "1"},
    )  # fmt: skip


def failure(out) -> str:
    """What a failed torchrun printed, without the Python frames of every rank's traceback."""
    lines = [re.sub(r"^\[rank\d+\]:", "", line).strip() for line in (out.stdout + out.stderr).splitlines()]
    return "\n".join(line for line in lines if not line.startswith(("File ", "^")))[-4000:]


def logged(out_dir) -> list[tuple]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [tuple(r.get(k) for k in LOGGED) for r in map(json.loads, f)]


def final_state(out_dir, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the final checkpoint (all pipeline parts, parameters and AdamW moments)."""
    path = os.path.join(out_dir, "checkpoints", f"step_{step}")
    checkpoint.verify(path)
    return {**checkpoint.load_parts(path, "model"), **checkpoint.load_parts(path, "optimizer")}


def assert_same_training(a, b, steps: int) -> None:
    assert logged(a) == logged(b)  # exact floats, each step once, in order
    assert [r[0] for r in logged(b)] == list(range(1, steps + 1))
    sa, sb = final_state(a, steps), final_state(b, steps)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    state_a, state_b = (
        checkpoint.load_state(os.path.join(d, "checkpoints", f"step_{steps}")) for d in (a, b)
    )
    assert state_a["scaler"] == state_b["scaler"] and state_a["tokens_seen"] == state_b["tokens_seen"]


def test_killed_ranks_restart_and_match_an_uninterrupted_run(tmp_path):
    """Two pipeline stages. Attempt 0: rank 1 (the last stage) is killed in the middle of step 3 (after its
    backward, before the optimizer step). Attempt 1 resumes from step_2 and rank 0 is killed half-way
    through writing its stage's part of step_4. Attempt 2 resumes from step_2 again (step_4.tmp is
    incomplete) and finishes. (Data-parallel and tensor-parallel restarts: the slow set.)"""
    args = ("parallel.pp=2", "train.steps=6", "run.ckpt_every=2", "run.log_every=1", "run.resume=true")
    ref = torchrun(2, [], *args, f"run.out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, failure(ref)
    faults = ["0:1:kill:3", "1:0:save:4"]
    # Three attempts in one torchrun: allow for a machine shared with other jobs.
    out = torchrun(2, faults, *args, f"run.out_dir={tmp_path / 'run'}", restarts=2, timeout=600)
    assert out.returncode == 0, failure(out)
    text = out.stdout + out.stderr
    assert "fault_inject: killing rank 1 in step 3" in text
    assert (
        f"fault_inject: killing rank 0 while writing {tmp_path / 'run'}/checkpoints/step_4.tmp/model_pp0.pt"
        in text
    )
    assert text.count(f"resumed from {tmp_path / 'run'}/checkpoints/step_2 at step 2") == 2
    assert_same_training(tmp_path / "ref", tmp_path / "run", 6)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_2", "step_4", "step_6"]


@pytest.mark.slow
def test_stalled_rank_times_out_naming_the_collective(tmp_path):
    """Rank 1 stalls before step 2; rank 0 finishes its backward and waits for the gradient all-reduce,
    which gives up after dist.timeout_s and says so in one line. Step 1's checkpoint stays intact. (The
    grid's groups once ignored dist.timeout_s and waited 30 minutes: this would then hang.)"""
    out_dir = tmp_path / "run"
    # 20 s: a rank slowed by a loaded machine (a checkpoint write, a late start) must not be taken for the
    # stalled one, which sleeps for an hour.
    args = ("train.steps=4", "run.ckpt_every=1", "dist.timeout_s=20", f"run.out_dir={out_dir}")
    out = torchrun(2, ["0:1:stall:2"], *args, timeout=120)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert errors == [
        "dtrain: error: rank 0: the gradient reduction over the data-parallel group (ranks 0, 1) in step 2 "
        "timed out after 20s: a rank of that group is stalled or has died (its own log says which); raise "
        "dist.timeout_s if this phase is just slow"
    ], failure(out)
    assert checkpoint.list_checkpoints(str(out_dir)) == [str(out_dir / "checkpoints" / "step_1")]
    checkpoint.verify(str(out_dir / "checkpoints" / "step_1"))
    assert [r[0] for r in logged(out_dir)] == [1]


MIXED = {
    # layout, faults: a kill mid-step, then a kill while the last pipeline stage writes its part
    "dp4": ((), ["0:1:kill:3", "1:0:save:4"]),
    "tp2-dp2": (("parallel.tp=2",), ["0:3:kill:7", "1:0:save:8:optimizer_pp0.pt"]),
    "pp2-dp2": (("parallel.pp=2",), ["0:2:kill:5", "1:2:save:8:model_pp1.pt"]),
}


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "faults"), MIXED.values(), ids=MIXED.keys())
def test_restarts_under_mixed_layouts(tmp_path, layout, faults):
    args = (*layout, "train.steps=10", "run.ckpt_every=4", "run.log_every=5", "run.resume=true")
    ref = torchrun(4, [], *args, f"run.out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, failure(ref)
    out = torchrun(4, faults, *args, f"run.out_dir={tmp_path / 'run'}", restarts=2)
    assert out.returncode == 0, failure(out)
    assert (out.stdout + out.stderr).count("fault_inject: killing rank") == 2
    assert_same_training(tmp_path / "ref", tmp_path / "run", 10)


@pytest.mark.slow
def test_soak_with_periodic_checkpoints_and_a_restart(tmp_path):
    """A few hundred steps on 4 ranks (tensor x data parallel, fp16 with loss scaling, dropout), checkpoints
    every 20 steps keeping 2, and one rank killed in step 130: equal to an uninterrupted run."""
    args = (
        "parallel.tp=2", "train.steps=240", "train.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.precision=fp16", "model.dropout=0.1", "run.ckpt_every=20",
        "run.keep_checkpoints=2", "run.log_every=40", "train.eval_every=80", "run.resume=true",
    )  # fmt: skip
    ref = torchrun(4, [], *args, f"run.out_dir={tmp_path / 'ref'}", timeout=900)
    assert ref.returncode == 0, failure(ref)
    out = torchrun(4, ["0:1:kill:130"], *args, f"run.out_dir={tmp_path / 'run'}", restarts=1, timeout=900)
    assert out.returncode == 0, failure(out)
    assert f"resumed from {tmp_path / 'run'}/checkpoints/step_120 at step 120" in out.stdout + out.stderr
    assert_same_training(tmp_path / "ref", tmp_path / "run", 240)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_220", "step_240"]


@pytest.mark.parametrize("variable", ["1", pytest.param("0", marks=pytest.mark.slow)])
def test_static_rendezvous_with_restarts_is_refused_saying_what_restarts(tmp_path, variable):
    """torchrun --master-port P --max-restarts 1 runs the static rendezvous, whose store is shared with the
    workers whatever TORCH_DISABLE_SHARE_RDZV_TCP_STORE says ("0": as if unset): dtrain refuses at the
    first start (torchrun then restarts the worker once, which refuses again) and names what restarts."""
    from dtrain.runtime import free_port

    out_dir = tmp_path / "run"
    out = run_python(
        "-m", "torch.distributed.run", "--master-port", str(free_port()), "--nproc-per-node", "1",
        "--max-restarts", "1", "--monitor-interval", "0.1",
        "-m", "dtrain", "train", TINY, "train.steps=1", f"run.out_dir={out_dir}",
        timeout=180, env={NO_SHARED_STORE: variable},
    )  # fmt: skip
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], failure(out)  # the first start and the restart
    assert errors[0].startswith("dtrain: error: torchrun --max-restarts 1 with ")
    assert "--standalone (or no rendezvous options) on one node, --rdzv-backend c10d" in errors[0]
    if variable == "1":
        assert "the static rendezvous (--master-port, --rdzv-backend static) cannot restart" in errors[0]
    assert not out_dir.exists()


def test_launcher_refuses_restarts_under_the_static_rendezvous():
    """python -m launch says it before starting torchrun; one node without rendezvous options is c10d."""
    from dtrain.config import ConfigError
    from launch import build_torchrun_argv

    for opts in (
        ["--master-port", "29600"],
        ["--rdzv-backend=static", "--rdzv-endpoint=h:1"],
        ["--nnodes=2"],
    ):
        with pytest.raises(ConfigError, match=r"^torchrun --max-restarts 2 with the static rendezvous"):
            build_torchrun_argv([*opts, "--max-restarts", "2", TINY])
        build_torchrun_argv([*opts, "--max-restarts", "0", TINY])
    for opts in ([], ["--standalone"], ["--master-addr", "127.0.0.1"], ["--rdzv-backend", "c10d"]):
        build_torchrun_argv([*opts, "--max_restarts=2", TINY])


def test_launcher_gives_torchrun_a_fresh_store_per_attempt(monkeypatch):
    """`python -m launch --max-restarts N` must work without the user knowing about the shared store."""
    import torch.distributed.run

    import launch

    seen = {}
    monkeypatch.delenv(NO_SHARED_STORE, raising=False)
    monkeypatch.setattr(
        torch.distributed.run, "main", lambda argv: seen.update(env=os.environ.get(NO_SHARED_STORE))
    )
    launch.main(["--max-restarts", "3", TINY, "train.steps=1"])
    assert seen == {"env": "1"}

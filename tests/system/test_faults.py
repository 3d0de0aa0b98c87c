"""Faults inside a run, in a Gloo world: a full disk during a checkpoint save, non-finite losses and
gradients on one rank, ranks that disagree on their config or code, collectives that time out, and
checkpoints corrupted on disk. Each case checks the exact one-line error, that every rank takes the same
decision, and that earlier outputs are intact."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from dtrain import checkpoint, resilience
from tests import harness
from tests.reference import tiny_config

WORLD = 2


def _trainer(*overrides: str):
    from dtrain.trainer import Trainer

    cfg = tiny_config(dist.get_world_size(), *overrides)
    p = cfg.parallel
    return Trainer(cfg, harness.grid(tp=p.tp, pp=p.pp, dp=p.dp), torch.device("cpu"))


def _steps(out_dir: str) -> list[int]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# --- a full disk during a save ------------------------------------------------------------------------


def full_disk_case(out_dir: str, layout: tuple[str, ...], rank: int, name: str) -> dict:
    """Checkpoints at steps 2 and 4; writing `name` of step_4 on `rank` fails with ENOSPC after a few
    bytes made it to disk. Every rank must raise the same error; step_2 must stay complete."""
    common = (*layout, f"run.out_dir={out_dir}", "train.steps=4", "run.ckpt_every=2")
    write_file = checkpoint._write_file

    def full_disk(path: str, write) -> None:
        folder, file = os.path.split(path)
        if os.path.basename(folder) == "step_4.tmp" and file == name and dist.get_rank() == rank:
            with open(path, "wb") as f:
                f.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        write_file(path, write)

    checkpoint._write_file = full_disk
    try:
        _trainer(*common).fit()
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    finally:
        checkpoint._write_file = write_file
    dist.barrier()
    after = sorted(os.listdir(os.path.join(out_dir, "checkpoints")))
    checkpoint.verify(os.path.join(out_dir, "checkpoints", "step_2"))
    logged = _steps(out_dir)
    dist.barrier()
    resumed = [r["step"] for r in _trainer(*common, "run.resume=true").fit()]  # the disk has room again
    return {"error": error, "after": after, "logged": logged, "resumed": resumed}


FULL_DISK = {
    "data-file-rank0": ((), 0, "model_pp0.pt"),
    "manifest-rank0": ((), 0, "manifest.json"),
    "pp-part-rank1": (("parallel.pp=2",), 1, "optimizer_pp1.pt"),
}


@pytest.mark.parametrize(("layout", "rank", "name"), FULL_DISK.values(), ids=FULL_DISK.keys())
def test_full_disk_during_save_keeps_the_previous_checkpoint(world2, tmp_path, layout, rank, name):
    out = tmp_path / "run"
    infos = world2.run(full_disk_case, str(out), layout, rank, name)
    path = out / "checkpoints" / "step_4.tmp" / name
    expected = (
        f"could not write checkpoint {out}/checkpoints/step_4 (rank {rank}: [Errno 28] No space left on "
        f"device: '{path}'); step_2 is intact; fix the cause (free disk space, permissions) and rerun with "
        f"run.resume=true"
    )
    assert [i["error"] for i in infos] == [expected] * WORLD  # the same line on every rank
    assert infos[0]["after"] == ["step_2"]  # no step_4, no step_4.tmp left behind
    assert infos[0]["logged"] == [1, 2, 3, 4]
    assert infos[0]["resumed"] == [3, 4]


# --- non-finite losses and gradients ------------------------------------------------------------------


def non_finite_case(out_dir: str, kind: str, steps: tuple[int, ...], *overrides: str) -> dict:
    """Inject a non-finite value on rank 1 only, in each of `steps`: `grad` multiplies one weight's local
    gradient by inf (before the data-parallel reduction), `loss` adds inf to the loss while every gradient
    stays finite."""
    trainer = _trainer(f"run.out_dir={out_dir}", "train.steps=5", "run.ckpt_every=2", *overrides)
    wq = trainer.model.chunks[0].blocks["0"].attn.wq.weight
    poisoned = lambda: dist.get_rank() == 1 and trainer.step + 1 in steps  # noqa: E731
    if kind == "grad":
        wq.register_hook(lambda g: g * float("inf") if poisoned() else g)
    else:
        run = trainer.model.executor.run
        trainer.model.executor.run = lambda *a, **k: run(*a, **k) + (float("inf") if poisoned() else 0.0)
    params = {}
    train_step = trainer.train_step

    def step():
        params[trainer.step] = trainer.canonical_state()  # the parameters going into each step
        return train_step()

    trainer.train_step = step
    try:
        records, error = trainer.fit(), None
    except Exception as e:
        records, error = None, f"{type(e).__name__}: {e}"
    out = {"error": error, "records": records and [(r["step"], r.get("skipped", False)) for r in records]}
    out["scales"] = records and [r["loss_scale"] for r in records if "loss_scale" in r]
    last = max(params)
    out["unchanged_by_failed_step"] = error is not None and all(
        torch.equal(v, trainer.canonical_state()[n]) for n, v in params[last].items()
    )
    out["checkpoints"] = [os.path.basename(c) for c in checkpoint.list_checkpoints(out_dir)]
    if out["checkpoints"]:
        checkpoint.verify(checkpoint.list_checkpoints(out_dir)[-1])
    out["logged"] = _steps(out_dir)
    return out


@pytest.mark.parametrize(
    ("kind", "what"), [("grad", "gradient norm (nan)"), ("loss", "loss (inf)")], ids=["grad", "loss"]
)
def test_non_finite_stops_every_rank_naming_the_step(world2, tmp_path, kind, what):
    """fp32: a NaN gradient or an infinite loss on one rank stops every rank at that step, before the
    optimizer touches the parameters; the checkpoint of step 2 stays the newest and intact."""
    infos = world2.run(non_finite_case, str(tmp_path / "run"), kind, (3,))
    expected = (
        f"TrainingError: non-finite {what} at step 3; lower train.lr or use train.precision=fp32; the last "
        f"checkpoint is intact"
    )
    for info in infos:
        assert info["error"] == expected
        assert info["unchanged_by_failed_step"]
    assert infos[0]["checkpoints"] == ["step_2"]
    assert infos[0]["logged"] == [1, 2]


def test_fp16_skips_overflowing_steps_and_stops_after_max_skipped(world2, tmp_path):
    # Overflow in steps 2 and 4: both skipped by every rank, the scale halves each time, training goes on.
    infos = world2.run(non_finite_case, str(tmp_path / "a"), "grad", (2, 4), "train.precision=fp16")
    for info in infos:
        assert info["error"] is None
        assert info["records"] == [(1, False), (2, True), (3, False), (4, True), (5, False)]
        assert info["scales"] == [2.0**16, 2.0**15, 2.0**15, 2.0**14, 2.0**14]
    # An infinite loss with finite gradients counts as an overflow too; two in a row hit the limit.
    overrides = ("train.precision=fp16", "train.max_skipped_steps=2")
    infos = world2.run(non_finite_case, str(tmp_path / "b"), "loss", (2, 3), *overrides)
    for info in infos:
        assert info["error"] == (
            "TrainingError: 2 consecutive fp16 overflows up to step 3; use train.precision=bf16 or lower "
            "train.lr"
        )
    assert infos[0]["checkpoints"] == ["step_2"] and infos[0]["logged"] == [1, 2]


# --- ranks that disagree ------------------------------------------------------------------------------


def agreement_case(change: str) -> list[str]:
    """Rank 1 runs with one thing changed; returns each check's error (or 'ok')."""
    cfg = tiny_config(dist.get_world_size())
    own = resilience.fingerprint(cfg)
    if dist.get_rank() == 1:
        if change == "config":
            own["config"]["train.lr"] = 0.02
        elif change == "code":
            own["code"]["parallel/zero.py"] = "0" * 16
        elif change == "missing-file":
            del own["code"]["dtrain/resilience.py"]
        elif change == "torch":
            own["versions"]["torch"] = "2.0.0"
    try:
        resilience.check_ranks_agree(cfg, _fingerprint=own)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


AGREEMENT = {
    "same": "ok",
    "config": "ConfigError: rank 1 was started with train.lr=0.02 where rank 0 has 0.01; start every rank "
    "with the same CONFIG and overrides",
    "code": "ConfigError: rank 1 has another parallel/zero.py (its dtrain source differs from rank 0's); "
    "install the same commit on every node",
    "missing-file": "ConfigError: rank 1 lacks dtrain/resilience.py (its dtrain source differs from rank "
    "0's); install the same commit on every node",
    "torch": f"ConfigError: rank 1 runs torch 2.0.0 where rank 0 runs torch {torch.__version__}; use one "
    "environment everywhere",
}


@pytest.mark.parametrize("change", AGREEMENT)
def test_ranks_must_agree_on_config_code_and_versions(world2, change):
    assert world2.run(agreement_case, change) == [AGREEMENT[change]] * WORLD


# --- collective failures named by phase ---------------------------------------------------------------


def phase_case(error: str, layout: tuple[str, ...]) -> str:
    """A collective error raised inside the gradient reduction of step 1, as Gloo would raise it."""
    trainer = _trainer(*layout)
    original = trainer.grad_sync.finish_grad_sync

    def failing():
        original()
        raise RuntimeError(error)

    trainer.grad_sync.finish_grad_sync = failing
    trainer.phases = resilience.CollectivePhases(trainer.grid, trainer.cfg.parallel.zero, timeout_s=3)
    try:
        trainer.train_step()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


GLOO_TIMEOUT = (
    "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"
)
GLOO_PEER = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:16603"


@pytest.mark.parametrize(
    ("error", "layout", "expected"),
    [
        (
            GLOO_TIMEOUT,
            (),
            "CollectiveError: the gradient reduction over the data-parallel group (ranks 0, 1) in step 1 "
            "timed out after 3s: a rank of that group is stalled or has died (its own log says which); "
            "raise dist.timeout_s if this phase is just slow",
        ),
        (
            GLOO_PEER,
            ("parallel.zero=2",),
            "CollectiveError: a peer closed its connection during the gradient reduction over the "
            "data-parallel group (ranks 0, 1) in step 1: that rank has died (see its log)",
        ),
        (
            "mat1 and mat2 shapes cannot be multiplied",
            (),
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied",
        ),
    ],
    ids=["timeout", "peer-gone-zero2", "other-error-untouched"],
)
def test_collective_failures_are_named_by_phase(world2, error, layout, expected):
    assert world2.run(phase_case, error, layout) == [expected] * WORLD


def phases_exist_case(layout: tuple[str, ...]) -> str:
    """Every phase the trainer enters in a step, an evaluation and a save is named (KeyError if not)."""
    trainer = _trainer(*layout, "train.eval_batches=1")
    trainer.phases = resilience.CollectivePhases(trainer.grid, trainer.cfg.parallel.zero, timeout_s=30)
    trainer.train_step()
    trainer.evaluate()
    trainer._record(trainer.train_step(), 1.0)
    return "ok"


@pytest.mark.parametrize("layout", [(), ("parallel.zero=1",), ("parallel.zero=3",), ("parallel.pp=2",)])
def test_every_named_phase_exists(world2, layout):
    assert world2.run(phases_exist_case, layout) == ["ok"] * WORLD


# --- corrupted checkpoints ----------------------------------------------------------------------------


def two_checkpoints_case(out_dir: str) -> None:
    _trainer(f"run.out_dir={out_dir}", "train.steps=4", "run.ckpt_every=2", "run.keep_checkpoints=0").fit()


@pytest.fixture(scope="module")
def saved_run(world2, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    world2.run(two_checkpoints_case, str(out))
    return out


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(100)


def _flip_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


CORRUPTIONS = {
    "truncated": (
        lambda d: _truncate(d / "model_pp0.pt"),
        "{d}/model_pp0.pt does not match its checksum in manifest.json (corrupted or truncated)",
    ),
    "flipped-byte": (
        lambda d: _flip_byte(d / "optimizer_pp0.pt"),
        "{d}/optimizer_pp0.pt does not match its checksum in manifest.json (corrupted or truncated)",
    ),
    "missing-file": (
        lambda d: os.remove(d / "state.json"),
        "{d}/state.json is missing (corrupted checkpoint)",
    ),
    "manifest-garbage": (
        lambda d: (d / "manifest.json").write_bytes(b"\x00\xff{"),
        "{d}/manifest.json is not valid JSON (corrupted checkpoint)",
    ),
    "manifest-without-files": (
        lambda d: (d / "manifest.json").write_text('{"format": 1, "step": 4}'),
        "{d}/manifest.json does not list the checkpoint's files (corrupted checkpoint)",
    ),
    "no-manifest": (
        lambda d: os.remove(d / "manifest.json"),
        "{d} has no manifest.json: not a checkpoint, or its save did not finish",
    ),
    "unlisted-file": (
        lambda d: (d / "model_pp1.pt").write_bytes(b"x"),
        "{d} holds model_pp1.pt, which manifest.json does not list; remove it",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupted_checkpoint_is_reported_and_the_previous_used(saved_run, tmp_path, corruption):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    newest = run / "checkpoints" / "step_4"
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(newest)
    expected = message.format(d=newest)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.verify(str(newest))
    assert str(e.value) == expected
    warnings = []
    assert checkpoint.latest_valid(str(run), warn=warnings.append) == str(run / "checkpoints" / "step_2")
    assert warnings == [f"warning: skipping checkpoint: {expected}"]


def test_renamed_checkpoint_is_refused(saved_run, tmp_path):
    """A copy of step_4 named step_6 would resume at step 4 while looking like step 6."""
    shutil.copytree(saved_run / "checkpoints" / "step_4", tmp_path / "step_6")
    with pytest.raises(checkpoint.CheckpointError, match="holds step 4 according to its manifest"):
        checkpoint.verify(str(tmp_path / "step_6"))

"""Bad input to `dtrain train` and `dtrain export`: each case is one line on stderr, exit status 2, and
nothing created or changed in run.out_dir. Run in-process through dtrain.cli.main (the checks all happen
before any process group exists; a case that got that far would fail here loudly), plus what a checkpoint
or data file may not make dtrain do: run pickled code or read the environment."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dtrain import cli, run_folder, runtime
from dtrain.config import ConfigError
from tests import harness
from tests.reference import TINY, tiny_config

CONFIG = os.path.join(harness.repo_root(), "configs", "tiny.yaml")


class Payload:
    """Unpickling this runs a shell command that creates a file: proof that the load executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    def refuse(*_):
        raise AssertionError("bad input reached process-group creation")

    monkeypatch.setattr(runtime, "init_distributed", refuse)
    for name in ("WORLD_SIZE", "RANK", "TORCHELASTIC_MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)


def tree(path) -> dict | None:
    """Every file under `path` with its size and content hash (None if `path` does not exist)."""
    if not os.path.exists(path):
        return None
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            file = os.path.join(folder, name)
            with open(file, "rb") as f:
                out[os.path.relpath(file, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fails(capsys, argv: list[str], out_dir) -> str:
    """Run the command line; assert exit status 2, one line on stderr, out_dir untouched; return the line."""
    before = tree(out_dir)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert tree(out_dir) == before
    return err.strip()


def train(out_dir, *overrides: str) -> list[str]:
    return ["train", CONFIG, *TINY, f"run.out_dir={out_dir}", *overrides]


# --- configs ------------------------------------------------------------------------------------------


CONFIGS = {
    "mistyped-key": (("train.stesp=3",), "unknown config key 'train.stesp'; did you mean 'train.steps'?"),
    "mistyped-section": (("trian.steps=3",), "unknown config key 'trian'; did you mean 'train'?"),
    "section-as-value": (
        ("train=3",),
        "train=3 in the overrides: train is a section; set its keys, e.g. train.steps",
    ),
    "wrong-type": (("train.lr=fast",), "train.lr='fast' has the wrong type (expected float)"),
    "env-resolver": (
        ("run.out_dir=${oc.env:HOME}",),
        "run.out_dir='${oc.env:HOME}' in the overrides calls an omegaconf resolver; configs are data: write "
        "the value itself (a plain ${section.key} reference is allowed)",
    ),
    "tp-vs-world": (
        ("WORLD=4", "parallel.tp=3"),
        "world size 4 is not divisible by tp*pp*cp=3; change parallel.tp/pp/cp or the process count",
    ),
    "too-many-stages": (
        ("WORLD=4", "parallel.pp=4"),
        "model.n_layers=2 cannot be split into 4 pipeline chunks (parallel.pp * pp_virtual_stages); lower "
        "parallel.pp or pp_virtual_stages",
    ),
    "cp-seq-len": (
        ("WORLD=2", "parallel.cp=2", "train.seq_len=14"),
        "train.seq_len=14 must be divisible by 2*parallel.cp=4 (load-balanced chunks)",
    ),
    "cp-dropout": (
        ("WORLD=2", "parallel.cp=2", "model.dropout=0.1"),
        "model.dropout=0.1: ring attention has no dropout; set it to 0 with cp",
    ),
    "cp-experts-tp": (
        ("WORLD=8", "parallel.cp=2", "parallel.tp=4", "model.moe.num_experts=4", "train.seq_len=20"),
        "train.seq_len/parallel.cp=10 must be divisible by parallel.tp=4 (MoE layers split tokens over tp)",
    ),
    "cp-sp-seq-len": (
        ("WORLD=8", "parallel.cp=2", "parallel.tp=4", "parallel.sp=true", "train.seq_len=20"),
        "train.seq_len/parallel.cp=10 must be divisible by parallel.tp=4 for sequence parallelism",
    ),
    "ledger-every": (
        ("run.ledger_every=0",),
        "run.ledger_every=0 must be at least 1 (the ledger counts one logging step in N)",
    ),
    "compile-tp": (
        ("WORLD=2", "parallel.tp=2", "train.compile=true"),
        "train.compile=true with parallel.tp=2 is not supported; set train.compile=false",
    ),
    "compile-cp": (
        ("WORLD=2", "parallel.cp=2", "train.compile=true"),
        "train.compile=true with parallel.cp=2 is not supported; set train.compile=false",
    ),
    "compile-experts": (
        ("model.moe.num_experts=4", "train.compile=true"),
        "train.compile=true with model.moe.num_experts=4 is not supported; set train.compile=false",
    ),
    "world-mismatch": (
        ("WORLD=4", "parallel.dp=2"),
        "parallel.dp*tp*pp*cp=2 does not match the world size 4; set parallel.dp=-1 or launch 2 processes",
    ),
    "dp-shard-not-dividing": (
        ("WORLD=4", "parallel.zero=1", "parallel.dp_shard=3"),
        "parallel.dp_shard=3 must divide parallel.dp*cp=4 (or be -1 for all of them)",
    ),
    "dp-shard-without-zero": (
        ("WORLD=4", "parallel.dp_shard=2"),
        "parallel.dp_shard=2 shards ZeRO state; it needs parallel.zero >= 1 (or dp_shard=-1)",
    ),
    "dp-shard-splits-experts": (
        ("WORLD=4", "parallel.zero=2", "parallel.ep=4", "model.moe.num_experts=4", "parallel.dp_shard=2"),
        "parallel.dp_shard=2 must be a multiple of parallel.cp*ep=4, so a shard group holds whole context "
        "groups and the same share of every expert",
    ),
}


@pytest.mark.parametrize(("overrides", "message"), CONFIGS.values(), ids=CONFIGS.keys())
def test_bad_config(capsys, monkeypatch, tmp_path, overrides, message):
    world = [o.split("=")[1] for o in overrides if o.startswith("WORLD=")]
    if world:
        monkeypatch.setenv("WORLD_SIZE", world[0])
    overrides = [o for o in overrides if not o.startswith("WORLD=")]
    out = tmp_path / "run"
    assert fails(capsys, train(out, *overrides), out) == f"dtrain: error: {message}"
    assert not out.exists()


def test_bad_yaml_files(capsys, tmp_path):
    out = tmp_path / "run"
    cases = {
        "train:\n  stpes: 3\n": "unknown config key 'train.stpes'; did you mean 'train.steps'?",
        "- 1\n- 2\n": "must be a mapping of sections (model:, train:, ...), not a list or value",
        "run:\n  out_dir: ${oc.env:HOME}\n": "calls an omegaconf resolver",
        "train: [1, 2]\n": "train=[1, 2] in config file",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        line = fails(capsys, ["train", str(path), f"run.out_dir={out}"], out)
        assert line.startswith("dtrain: error: ") and message in line, line


# --- data files ---------------------------------------------------------------------------------------


def _memmap(folder, train_tokens, val_tokens=None) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        if tokens is not None:
            np.save(os.path.join(folder, f"{name}.npy"), tokens, allow_pickle=False)
    return ["data.kind=memmap", f"data.path={folder}"]


def test_missing_and_malformed_data_files(capsys, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "data"
    line = fails(capsys, train(out, "data.kind=memmap", f"data.path={data}"), out)
    assert line == f"dtrain: error: data.path='{data}' does not exist; create it with `dtrain prepare-data`"
    data.mkdir()
    (data / "train.npy").write_text("token ids, one per line\n")
    line = fails(capsys, train(out, "data.kind=memmap", f"data.path={data}"), out)
    assert line == (
        f"dtrain: error: data file '{data}/train.npy' is not a .npy array (no NUMPY header); write token "
        f"files with `dtrain prepare-data` or np.save of a 1-D uint16/uint32 array"
    )
    args = _memmap(data, np.zeros((64, 64), dtype=np.uint16))
    line = fails(capsys, train(out, *args), out)
    assert line.endswith("has shape (64, 64); token files must be 1-D (flatten)")
    args = _memmap(data, np.zeros(4096, dtype=np.float32))
    line = fails(capsys, train(out, *args), out)
    assert line.endswith("has dtype float32; token files must be uint16/uint32")


def test_pickled_data_file_is_never_unpickled(capsys, tmp_path):
    marker = tmp_path / "executed"
    data = tmp_path / "data"
    os.makedirs(data)
    np.save(data / "train.npy", np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    out = tmp_path / "run"
    line = fails(capsys, train(out, "data.kind=memmap", f"data.path={data}"), out)
    assert line == (
        f"dtrain: error: data file '{data}/train.npy' is not a .npy array dtrain can read: it holds Python "
        f"objects, which dtrain never unpickles"
    )
    assert not marker.exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_beyond_vocabulary_anywhere_in_the_file(capsys, tmp_path, split):
    """The bad id sits far past the first batches: found at start-up, before anything is written."""
    tokens = np.random.default_rng(0).integers(0, 96, size=200_000).astype(np.uint16)
    bad = tokens.copy()
    bad[150_001] = 300
    args = _memmap(tmp_path / "data", bad if split == "train" else tokens, bad if split == "val" else tokens)
    out = tmp_path / "run"
    assert fails(capsys, train(out, *args), out) == (
        f"dtrain: error: data file '{tmp_path}/data/{split}.npy' holds token id 300 at position 150001, "
        f"outside [0, model.vocab_size=96); raise model.vocab_size or re-tokenize"
    )
    assert not out.exists()


# --- checkpoints --------------------------------------------------------------------------------------


def save_case(out_dir: str) -> None:
    from dtrain.trainer import Trainer

    cfg = tiny_config(dist.get_world_size(), f"run.out_dir={out_dir}", "train.steps=4", "run.ckpt_every=2")
    Trainer(cfg, harness.grid(dp=dist.get_world_size()), torch.device("cpu")).fit()


@pytest.fixture(scope="module")
def saved(world2, tmp_path_factory):
    """A finished 4-step run of the tiny model (d_model 32) with its checkpoints step_2 and step_4."""
    out = tmp_path_factory.mktemp("saved") / "run"
    world2.run(save_case, str(out))
    return out


def test_checkpoint_of_another_model_shape(capsys, saved, tmp_path):
    def expected(path) -> str:
        return (
            f"dtrain: error: {path} was saved from another model shape (model.d_model=32 in the checkpoint, "
            f"48 here); set the same model.* values to resume it, or use another run.out_dir"
        )

    step_2 = saved / "checkpoints" / "step_2"
    out = tmp_path / "new"
    assert fails(capsys, train(out, "model.d_model=48", f"run.resume={step_2}"), out) == expected(step_2)
    assert not out.exists()
    # run.resume=true in the old run's folder names the checkpoint it would resume from, the newest, and
    # leaves its files untouched (fails() checks).
    line = fails(capsys, train(saved, "model.d_model=48", "run.resume=true"), saved)
    assert line == expected(saved / "checkpoints" / "step_4")
    # Settings that do not change a parameter's shape may differ.
    from dtrain.config import load_config
    from dtrain.run_folder import check_resume
    from dtrain.validation import validate

    check_resume(validate(load_config(CONFIG, [*TINY, "model.dropout=0.1", f"run.resume={step_2}"]), 1))


def test_fresh_run_into_an_earlier_runs_folder(capsys, saved):
    """run.resume=false where an earlier run left checkpoints and metrics: one line, nothing written."""
    line = fails(capsys, train(saved), saved)
    assert line == (
        f"dtrain: error: run.out_dir={saved} already holds an earlier run's outputs (checkpoints up to "
        f"step_4, metrics.jsonl, TensorBoard event files); continue that run with run.resume=true, write "
        f"this one elsewhere with another run.out_dir, or set run.overwrite=true to move the old outputs "
        f"aside into {saved}/replaced-<date>-<time>/ (nothing is deleted)"
    )
    line = fails(capsys, train(saved, "run.overwrite=true", "run.resume=true"), saved)
    assert line == "dtrain: error: run.overwrite=true starts afresh, run.resume=true continues a run: set one"


def test_overwrite_moves_the_earlier_outputs_aside(capsys, saved, tmp_path):
    """run.overwrite=true renames the earlier run's files into replaced-<date>-<time>/, byte for byte, and
    only then goes on to create the process group (refused here by the fixture)."""
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    (run / "notes.txt").write_text("mine")  # not a dtrain output: stays where it is
    before = tree(run)
    with pytest.raises(AssertionError, match="reached process-group creation"):
        cli.main(train(run, "run.overwrite=true"))
    aside = [name for name in os.listdir(run) if name.startswith("replaced-")]
    assert len(aside) == 1 and capsys.readouterr().out == (
        f"dtrain: run.overwrite=true: moved the earlier run's outputs to {run / aside[0]}\n"
    )
    moved = {os.path.relpath(k, aside[0]): v for k, v in tree(run).items() if k.startswith(aside[0])}
    assert moved == {k: v for k, v in before.items() if k != "notes.txt"}
    assert sorted(os.listdir(run)) == sorted([aside[0], "notes.txt"])
    # A second overwrite within the same second gets a numbered folder; nothing to move: no folder.

    (run / "metrics.jsonl").write_text("{}\n")
    stamp = aside[0].removeprefix("replaced-")
    again = run_folder.move_aside(str(run), now=time.mktime(time.strptime(stamp, "%Y%m%d-%H%M%S")))
    assert again == str(run / f"replaced-{stamp}-2") and os.listdir(again) == ["metrics.jsonl"]
    assert run_folder.move_aside(str(run)) is None


def test_resuming_a_complete_run_says_so(capsys, saved):
    """run.resume=true where the newest checkpoint is at train.steps: one line, exit 0, nothing written."""
    before = tree(saved)
    cli.main(train(saved, "run.resume=true", "train.steps=4"))
    assert capsys.readouterr().out == (
        f"dtrain: nothing to do: {saved}/checkpoints/step_4 is at step 4 and train.steps=4, so this run is "
        f"complete (raise train.steps to train further)\n"
    )
    cli.main(train(saved, f"run.resume={saved}/checkpoints/step_4", "train.steps=3"))
    assert "is at step 4 and train.steps=3, so this run is complete" in capsys.readouterr().out
    assert tree(saved) == before


def test_corrupted_checkpoint_given_explicitly(capsys, saved, tmp_path):
    copy = tmp_path / "step_2"
    shutil.copytree(saved / "checkpoints" / "step_2", copy)
    with open(copy / "optimizer_pp0.pt", "r+b") as f:
        f.truncate(1000)
    out = tmp_path / "new"
    assert fails(capsys, train(out, f"run.resume={copy}"), out) == (
        f"dtrain: error: {copy}/optimizer_pp0.pt does not match its checksum in manifest.json (corrupted or "
        f"truncated)"
    )


def _reseal(folder) -> None:
    """Recompute the manifest, as an attacker who controls the folder would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        data = (folder / name).read_bytes()
        meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_export_never_runs_code_from_a_checkpoint(capsys, saved, tmp_path):
    """A checkpoint with valid checksums but a pickled payload, or a config that reads the environment."""
    marker = tmp_path / "executed"
    evil = tmp_path / "step_2"
    shutil.copytree(saved / "checkpoints" / "step_2", evil)
    torch.save({"embed.weight": Payload(str(marker))}, evil / "model_pp0.pt")
    _reseal(evil)
    exported = tmp_path / "model.pt"
    assert fails(capsys, ["export", str(evil), "--out", str(exported)], exported) == (
        f"dtrain: error: {evil}/model_pp0.pt is not a tensor file dtrain can load safely: it holds pickled "
        f"objects other than tensors, which could run code"
    )
    assert not marker.exists() and not exported.exists()

    shutil.rmtree(evil)
    shutil.copytree(saved / "checkpoints" / "step_2", evil)
    state = json.loads((evil / "state.json").read_text())
    state["config"]["run"]["out_dir"] = "${oc.env:HOME}"
    (evil / "state.json").write_text(json.dumps(state))
    _reseal(evil)
    line = fails(capsys, ["export", str(evil), "--out", str(exported)], exported)
    assert "run.out_dir='${oc.env:HOME}' in the checkpoint's config calls an omegaconf resolver" in line


def test_export_onto_a_full_disk_leaves_nothing_behind(capsys, monkeypatch, saved, tmp_path):
    exported = tmp_path / "model.pt"

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 torn")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(saved / "checkpoints" / "step_2"), "--out", str(exported)])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"dtrain: error: [Errno 28] No space left on device: '{exported}.tmp'\n"
    assert os.listdir(tmp_path) == []


def test_torchrun_restarts_need_a_fresh_store_per_attempt(monkeypatch):
    """A shared rendezvous store would hand restarted workers stale addresses (see dtrain.runtime). The
    line says what restarts: the c10d rendezvous with the variable set; the static rendezvous shares its
    store whatever the variable says, so with the variable set a shared store means static."""
    works = (
        "restarts need a c10d rendezvous with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
        "environment: --standalone (or no rendezvous options) on one node, --rdzv-backend c10d "
        "--rdzv-endpoint HOST:PORT on several (python -m launch sets the variable)"
    )
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    with pytest.raises(ConfigError) as e:
        runtime.check_restartable()
    assert str(e.value) == (
        "torchrun --max-restarts 2 with a shared rendezvous store cannot restart reliably (restarted "
        f"workers read stale peer addresses from it); {works}; the static rendezvous (--master-port) shares "
        "its store whatever the variable says"
    )
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with pytest.raises(ConfigError) as e:
        runtime.check_restartable()
    assert str(e.value) == (
        "torchrun --max-restarts 2 with the static rendezvous (--master-port, --rdzv-backend static) cannot "
        "restart reliably: it shares its store with the workers whatever TORCH_DISABLE_SHARE_RDZV_TCP_STORE "
        f"says, and restarted workers read stale peer addresses from it; {works}"
    )
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # c10d with the variable: a fresh store
    runtime.check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: nothing to go stale
    runtime.check_restartable()

"""`dtrain estimate` predicts, from the config alone (meta tensors, no process group), the bytes of
parameters, gradients and optimizer states a rank holds after a step: it must equal what a real run's
`Trainer.held_bytes()` measures, byte for byte (the estimator replays the same bucket planning and
padding)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.distributed as dist

from dtrain.config import ConfigError, load_config
from dtrain.estimate import estimate_model_states, meta_chunks, zero_bucket_numels
from dtrain.model import count_params
from tests import harness
from tests.reference import TINY, tiny_config

ROOT = harness.repo_root()

# Sizes that are not multiples of 4, so buckets get padded to a multiple of dp.
ODD = ("model.d_model=42", "model.n_heads=3", "model.n_kv_heads=1", "model.vocab_size=97")
SMALL_BUCKETS = ("parallel.bucket_mb=0.01",)  # ~10 KB: many buckets, several of them padded
TIED = ("model.tie_embeddings=true",)

# Every stage and valid offload, each on the odd-sized model (padding), with several small buckets or a tied
# embedding (the head in the embedding's ZeRO-3 unit); one case keeps the plain tiny model.
CASES = {
    "ddp-buckets": (0, "none", ODD + SMALL_BUCKETS),
    "ddp-tied": (0, "none", ODD + TIED),
    "zero1-buckets": (1, "none", ODD + SMALL_BUCKETS),
    "zero1-offload-tied-buckets": (1, "optimizer", ODD + TIED + SMALL_BUCKETS),
    "zero2-tied": (2, "none", ODD + TIED),
    "zero2-offload-buckets": (2, "optimizer", ODD + SMALL_BUCKETS),
    "zero3-plain": (3, "none", ()),
    "zero3-offload-tied": (3, "optimizer", ODD + TIED),
    "zero3-offload-all": (3, "all", ODD),
    "zero3-offload-all-tied": (3, "all", ODD + TIED),
}


def overrides(stage: int, offload: str, extra: tuple[str, ...]) -> list[str]:
    # The smallest step (one 8-token sequence per rank): held bytes do not depend on the batch.
    cheap = ("train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=1", "train.seq_len=8")
    return [f"parallel.zero={stage}", f"parallel.offload={offload}", *cheap, *extra]


def measured_cases() -> dict:
    """Every case on this world: build a Trainer, take one step, read held_bytes()."""
    from dtrain.trainer import Trainer

    world = dist.get_world_size()
    out = {}
    torch.set_num_threads(1)
    for name, case in CASES.items():
        cfg = tiny_config(world, *overrides(*case))
        trainer = Trainer(cfg, harness.grid(dp=world), torch.device("cpu"))
        trainer.train_step()  # optimizer state exists after the first step
        out[name] = trainer.held_bytes()
    return out


@pytest.mark.parametrize("fixture", ["world2", "world4"])
def test_estimate_equals_measured_held_bytes(request, fixture):
    world = request.getfixturevalue(fixture)
    results = world.run(measured_cases)
    for name, case in CASES.items():
        est = estimate_model_states(load_config(None, [*TINY, *overrides(*case)]), world.size)
        want = {"device": est["device"], "host": est["host"]}
        for rank, measured in enumerate(results):
            assert measured[name] == want, (name, rank, measured[name], want)


def test_small_buckets_are_several_and_padded():
    """The bucket case above really exercises the planning: several buckets, some padded for dp=4."""
    cfg = tiny_config(4, *overrides(1, "none", ODD + SMALL_BUCKETS))
    numels = zero_bucket_numels(cfg, meta_chunks(cfg, 0))
    assert len(numels) > 5
    assert any(n % 4 for n in numels)
    assert sum(numels) == sum(p.numel() for p in meta_chunks(cfg, 0)[0].parameters())


def test_large_model_on_meta_matches_formulas():
    """A 1B model costs nothing to estimate (meta tensors) and lands on FORMULAS.md's bytes per parameter."""
    cfg = load_config(os.path.join(ROOT, "configs/gpu_1b.yaml"), ["parallel.zero=3", "parallel.offload=all"])
    est = estimate_model_states(cfg, 8)
    n = est["params"]
    assert 0.9e9 < n < 1.1e9
    assert est["device"]["params"] == 0 and est["device"]["optimizer"] == 0
    assert abs(est["device"]["grads"] / n - 4 / 8) < 1e-6
    assert abs(est["host"]["params"] / n - 4 / 8) < 1e-6
    assert abs(est["host"]["optimizer"] / n - 12 / 8) < 1e-6
    assert "FORMULAS.md ZeRO-3 offload=all, N=8" in est["formula"]


def test_pipeline_ranks_hold_their_own_chunks():
    cfg = load_config(None, [*TINY, "parallel.pp=2", "model.n_layers=3"])
    est = estimate_model_states(cfg, 4)
    assert est["layout"]["dp"] == 2 and len(est["stages"]) == 2
    assert sum(s["params"] for s in est["stages"]) == count_params(cfg.model)["total"]
    for s in est["stages"]:
        assert s["device"]["params"] == 4 * s["params"]
        assert s["device"]["optimizer"] == 8 * s["params"]


def test_bad_world_is_a_config_error():
    with pytest.raises(ConfigError, match="does not match the world size"):
        estimate_model_states(load_config(None, [*TINY, "parallel.dp=2"]), 3)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return harness.run_python("-m", "dtrain", "estimate", *args, timeout=120)


def test_cli_prints_the_figures():
    out = run_cli("configs/tiny.yaml", "parallel.zero=2")
    assert out.returncode == 0, out.stderr
    # configs/tiny.yaml: dp=-1 with dist.nproc_per_node=2, so the default world is 2.
    est = estimate_model_states(load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["parallel.zero=2"]), 2)
    text = out.stdout
    assert "world 2 = dp 2" in text and "ZeRO-2" in text
    for where in ("device", "host"):
        for value in est[where].values():
            assert f"{value:,}" in text
    assert "FORMULAS.md ZeRO-2, N=2" in text


def test_cli_bad_config_is_one_line():
    # A world that does not fit the config fails the same way (test_bad_world_is_a_config_error).
    out = run_cli("configs/tiny.yaml", "parallel.zero=5")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: "), out.stderr

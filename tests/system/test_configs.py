"""The shipped configs load, validate and describe what their comments promise."""

from __future__ import annotations

import glob
import os

import pytest

from dtrain.config import load_config
from dtrain.model import count_params
from dtrain.validation import validate
from tests.harness import repo_root

CONFIGS = sorted(glob.glob(os.path.join(repo_root(), "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
    cfg = load_config(path)
    world = cfg.dist.nproc_per_node or 8
    validate(cfg, world)


def test_tiny_is_two_gloo_ranks_on_the_synthetic_stream():
    cfg = validate(load_config(os.path.join(repo_root(), "configs", "tiny.yaml")), 2)
    assert cfg.parallel.dp == 2 and cfg.dist.nproc_per_node == 2
    assert cfg.data.kind == "synthetic" and cfg.dist.backend == "auto"


def test_gpu_preset_is_about_one_billion_bf16():
    cfg = load_config(os.path.join(repo_root(), "configs", "gpu_1b.yaml"))
    assert 0.9e9 < count_params(cfg.model)["total"] < 1.1e9
    assert cfg.train.precision == "bf16"

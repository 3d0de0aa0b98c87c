"""Mixture-of-experts in the whole model (the layer and dispatch alone: tests/unit/test_moe_layer.py):
parameter counts, and training under expert, tensor, sequence and pipeline parallelism equal to torch DDP on
the same model with every expert local (float64 to 1e-10, fp32 losses and grad norms to 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dtrain.config import load_config
from dtrain.model import Transformer, count_params
from tests import harness
from tests.reference import (
    assert_within_fsdp2_noise,
    dtrain_run,
    layout_matches_ddp,
    tiny_config,
)

MOE = ("model.moe.num_experts=4", "model.moe.capacity_factor=1.0")


def test_count_params_counts_experts_and_routers():
    cfg = load_config(None, ["model.moe.num_experts=4", "model.moe.every_n_layers=2", "model.n_layers=4"])
    model = Transformer(cfg.model)
    counts = count_params(cfg.model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.model.d_model * model.blocks["1"].mlp.experts.w1.shape[1]
    assert counts["blocks"] - counts["blocks_active"] == 2 * (4 - cfg.model.moe.top_k) * per_expert
    assert [type(model.blocks[str(i)].mlp).__name__ for i in range(4)] == ["SwiGLU", "MoELayer"] * 2


def moe_training_case(layout: tuple[str, ...], overrides: tuple[str, ...]) -> dict:
    return layout_matches_ddp(layout, (*MOE, *overrides))


def _check_routing_metrics(result: dict, overrides: tuple[str, ...]) -> None:
    """Every routed slot is counted once over the world, and the capacity drops some."""
    k = 2 if "model.moe.top_k=2" in overrides else 1
    batch = 32 if "train.global_batch_size=32" in overrides else 16
    for step in result["moe"]:
        for layer in (0, 1):
            assert sum(step[f"moe/layer{layer}/tokens_per_expert"]) == batch * 16 * k
    assert max(step["moe/layer0/dropped_frac"] for step in result["moe"]) > 0


EP = ("parallel.ep=2",)
TOP1, TOP2 = ("model.moe.top_k=1",), ("model.moe.top_k=2",)
CASES_2 = {
    "ep2-dp2-top1": (EP, TOP1),
    "ep2-dp2-top2-clip-tied": (EP, (*TOP2, "train.grad_clip=0.05", "model.tie_embeddings=true")),
    "tp2-sp-top2": (("parallel.tp=2", "parallel.sp=true"), TOP2),
    "tp2-top1-ckpt": (("parallel.tp=2",), (*TOP1, "train.activation_checkpointing=true")),
}


# The default run keeps one case of each composition with experts: ep alone at 2 and 4 ranks, tp + sp,
# ep x tp + sp, ep x pp, and (below) ZeRO 1 and 3 with ep; these cover the same compositions again.
SLOW_MOE = {"tp2-top1-ckpt", "ep2-dp4-top2"}


def _cases(cases: dict) -> list:
    return [
        pytest.param(*v, id=k, marks=[pytest.mark.slow] if k in SLOW_MOE else []) for k, v in cases.items()
    ]


@pytest.mark.parametrize(("layout", "overrides"), _cases(CASES_2))
def test_moe_matches_torch_ddp_2_ranks(world2, layout, overrides):
    result = world2.run(moe_training_case, layout, overrides)[0]
    _check_routing_metrics(result, overrides)
    assert result["losses"][-1] < result["losses"][0]


EP4 = ("parallel.ep=4",)
CASES_4 = {
    "ep2-dp4-top2": (EP, TOP2),
    "ep4-dp4-top1": (EP4, TOP1),
    "ep2-tp2-sp-top2": ((*EP, "parallel.tp=2", "parallel.sp=true"), TOP2),
    "ep2-pp2-top1-every2": (
        (*EP, "parallel.pp=2"),
        (*TOP1, "model.n_layers=4", "model.moe.every_n_layers=2"),
    ),
}
SLOW_4 = {
    "ep2-dp4-top1": (EP, TOP1),
    "ep4-dp4-top2": (EP4, TOP2),
    "ep2-tp2-top1-ckpt": ((*EP, "parallel.tp=2"), (*TOP1, "train.activation_checkpointing=true")),
    "ep2-pp2-interleaved-top2": (
        (*EP, "parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2"),
        (*TOP2, "model.n_layers=4", "model.moe.every_n_layers=2"),
    ),
}


@pytest.mark.parametrize(("layout", "overrides"), _cases(CASES_4))
def test_moe_matches_torch_ddp_4_ranks(world4, layout, overrides):
    result = world4.run(moe_training_case, layout, overrides)[0]
    if "model.n_layers=4" not in overrides:
        _check_routing_metrics(result, overrides)


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "overrides"), SLOW_4.values(), ids=SLOW_4.keys())
def test_moe_matches_torch_ddp_4_ranks_full(world4, layout, overrides):
    world4.run(moe_training_case, layout, overrides)


BATCH_32 = ("train.global_batch_size=32",)
CASES_8 = {
    "ep4-dp8-top1": (EP4, (*TOP1, *BATCH_32)),
    "ep4-dp8-top2": (EP4, (*TOP2, *BATCH_32)),
    "ep2-dp8-top2": (EP, (*TOP2, *BATCH_32)),
}


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "overrides"), CASES_8.values(), ids=CASES_8.keys())
def test_moe_matches_torch_ddp_8_ranks(world8, layout, overrides):
    result = world8.run(moe_training_case, layout, overrides)[0]
    _check_routing_metrics(result, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.moe.top_k=5",), r"model.moe.top_k=5 must be in \[1, model.moe.num_experts=4\]"),
        (
            ("parallel.ep=3", "parallel.dp=3", "train.global_batch_size=24"),
            "parallel.ep=3 must divide model.moe.num_experts=4",
        ),
        (("model.moe.capacity_factor=0.001",), "model.moe.capacity_factor=0.001 gives experts no room"),
        (("model.moe.every_n_layers=3",), r"model.moe.every_n_layers=3 must be in \[1, model.n_layers=2\]"),
        (("model.moe.num_experts=0", "parallel.ep=2", "parallel.dp=2"), "parallel.ep=2 needs experts"),
    ],
)
def test_bad_moe_configs_fail_in_one_line(overrides, message):
    from dtrain.config import ConfigError
    from dtrain.validation import validate

    cfg = load_config(None, [*MOE, "model.n_layers=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, cfg.parallel.dp if cfg.parallel.dp > 0 else 1)


ZERO_CASES = {
    "zero1-ep2-dp4-top2": ("parallel.zero=1", *EP),
    "zero2-ep2-dp4-offload-top2": ("parallel.zero=2", *EP, "parallel.offload=optimizer"),
    "zero3-ep2-dp4-offload-all-top2": ("parallel.zero=3", *EP, "parallel.offload=all"),
}


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(v, id=k, marks=[pytest.mark.slow] if k.startswith("zero2") else [])
        for k, v in ZERO_CASES.items()
    ],
)
def test_moe_with_zero_matches_torch_ddp(world4, layout):
    """ZeRO shards dense state over dp and expert state over the expert-data-parallel group."""
    world4.run(moe_training_case, layout, (*TOP2, "train.grad_clip=0.05"))


# Every slot fits (capacity = T*k/E * E/k = T) and no load-balancing loss (its f.P product is taken per
# micro-batch): then the micro-batch size changes only rounding, and FSDP2's drift under it is the noise.
# The z-loss, a per-token mean, adds up over micro-batches the same way and stays.
MOE_16_BIT = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=2.0")
MOE_16_BIT += ("model.moe.aux_loss_coef=0.0", "model.moe.z_loss_coef=0.01")


def moe_low_precision_case(layout: tuple[str, ...], precision: str) -> None:
    """16-bit parameters (fp32 masters and reductions) with experts split over ep against torch FSDP2 on
    the whole model with the same mixed precision (test_tensor_parallel.py's low_precision_case): within
    LOW_PRECISION_NOISE_FACTOR times FSDP2's own drift when only the micro-batch size changes."""
    world = dist.get_world_size()
    overrides = (*MOE_16_BIT, f"train.precision={precision}", "train.steps=8")
    cfg = tiny_config(world, *layout, *overrides)
    p = cfg.parallel
    ours = dtrain_run(cfg, harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep))
    assert not any(ours["skipped"])
    assert_within_fsdp2_noise(ours, world, overrides, cfg.train.micro_batch_size)
    assert ours["moe"][-1]["moe/layer0/dropped_frac"] == 0  # capacity held every slot, as assumed


MOE_LOW = {
    "ep2-dp2-zero1-bf16": (("parallel.ep=2", "parallel.zero=1"), "bf16"),
    "ep2-dp2-fp16": (("parallel.ep=2",), "fp16"),
}


@pytest.mark.parametrize(
    ("layout", "precision"),
    [pytest.param(*v, id=k, marks=[pytest.mark.slow] if "fp16" in k else []) for k, v in MOE_LOW.items()],
)
def test_moe_in_16_bits_matches_torch_fsdp2(world2, layout, precision):
    world2.run(moe_low_precision_case, layout, precision)


def test_torchrun_moe_run_logs_routing_and_exports_every_expert(tmp_path):
    """A real torchrun job with ep=2: routing metrics in metrics.jsonl and TensorBoard, and `dtrain
    export` consolidates the experts of both ranks into the single-process model."""
    import json
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.harness import repo_root, run_python

    out = tmp_path / "run"
    config = os.path.join(repo_root(), "configs", "tiny.yaml")
    moe = ("model.moe.num_experts=4", "parallel.ep=2")
    result = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dtrain", "train", config, *moe, "train.steps=4", f"run.out_dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    cfg = load_config(config, list(moe))
    slots = cfg.train.global_batch_size * cfg.train.seq_len * cfg.model.moe.top_k
    for r in records:
        for layer in range(cfg.model.n_layers):
            assert sum(r[f"moe/layer{layer}/tokens_per_expert"]) == slots
            assert 0 <= r[f"moe/layer{layer}/dropped_frac"] < 1
        assert r["moe/aux_loss"] > 0 and r["moe/z_loss"] > 0
    tags = set(EventAccumulator(str(out)).Reload().Tags()["scalars"])
    assert {"moe/aux_loss", "moe/layer1/dropped_frac", "moe/layer0/tokens_per_expert/expert3"} <= tags, tags

    exported = tmp_path / "model.pt"
    result = run_python("-m", "dtrain", "export", str(out / "checkpoints" / "step_4"), "--out", str(exported))
    assert result.returncode == 0, result.stderr
    model = Transformer(cfg.model)
    model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    assert model.blocks["0"].mlp.experts.w1.shape[0] == 4

"""Tensor and sequence parallelism: whole-model training equal to torch DDP on the unsharded model, in
float64 (every parameter, to 1e-10) and in fp32 (losses and gradient norms, to 1e-5); see
tests/tolerances.py for why both."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import harness
from tests.reference import (
    assert_within_fsdp2_noise,
    dtrain_run,
    layout_matches_ddp,
    tiny_config,
)


def tp_training_case(tp: int, sp: bool, overrides: tuple[str, ...]) -> list[float]:
    return layout_matches_ddp((f"parallel.tp={tp}", f"parallel.sp={str(sp).lower()}"), overrides)


CASES = {
    "tp2": (2, False, ()),
    "tp2-sp": (2, True, ()),
    "tp2-sp-tied-odd-vocab": (2, True, ("model.tie_embeddings=true", "model.vocab_size=95")),
    "tp2-kv1-ckpt": (2, False, ("model.n_kv_heads=1", "train.activation_checkpointing=true")),
}


@pytest.mark.parametrize(("tp", "sp", "overrides"), CASES.values(), ids=CASES.keys())
def test_tp_matches_torch_ddp_2_ranks(world2, tp, sp, overrides):
    losses = world2.run(tp_training_case, tp, sp, overrides)[0]["losses"]
    assert losses[-1] < losses[0]


CASES_4 = {
    "tp4": (4, False, ("model.n_kv_heads=4",)),
    "tp4-sp-kv2-odd-vocab": (4, True, ("model.vocab_size=94",)),
    "tp2-dp2": (2, False, ()),
    "tp2-dp2-sp-accumulate-tied": (2, True, ("train.global_batch_size=32", "model.tie_embeddings=true")),
}


def _default_or_slow(cases: dict, default: str) -> list:
    """One case in the default run, the others in the slow set."""
    return [pytest.param(*v, id=k, marks=() if k == default else pytest.mark.slow) for k, v in cases.items()]


@pytest.mark.parametrize(("tp", "sp", "overrides"), _default_or_slow(CASES_4, "tp4-sp-kv2-odd-vocab"))
def test_tp_matches_torch_ddp_4_ranks(world4, tp, sp, overrides):
    world4.run(tp_training_case, tp, sp, overrides)


def dropout_case(sp: bool) -> dict:
    """Dropout streams under tp=2: replicated regions identical across tensor ranks, split regions
    different, and activation checkpointing replays exactly the masks of the first forward."""
    from dtrain.trainer import build_model, step_seed

    world = dist.get_world_size()
    cfg = tiny_config(world, "parallel.tp=2", f"parallel.sp={str(sp).lower()}", "model.dropout=0.3")
    grid = harness.grid(tp=2, dp=cfg.parallel.dp)
    model = build_model(cfg, grid, torch.device("cpu"))
    layers = model.blocks["0"].attn.layers
    torch.manual_seed(step_seed(0, 0, grid))
    with layers.split_region_rng():
        split_draw = torch.rand(64)
    with layers.residual_rng():
        residual_draw = torch.rand(64)
    after = torch.rand(64)  # the default stream must continue identically on every tensor rank
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        torch.manual_seed(step_seed(0, 1, grid))
        model(x, x).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    hidden = model.blocks["0"](model.embed(x), model.rope_cos, model.rope_sin)  # training mode: dropout on
    gathered = [torch.empty_like(t) for t in (split_draw, residual_draw, after) for _ in range(2)]
    for i, t in enumerate((split_draw, residual_draw, after)):
        dist.all_gather(gathered[2 * i : 2 * i + 2], t, group=grid.tp_group)
    return {
        "split_differs": not torch.equal(gathered[0], gathered[1]),
        "residual_differs": not torch.equal(gathered[2], gathered[3]),
        "after_equal": torch.equal(gathered[4], gathered[5]),
        "replayed": all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]),
        "hidden_shape": tuple(hidden.shape),
    }


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp-sp"])
def test_dropout_streams(world2, sp):
    info = world2.run(dropout_case, sp)[0]
    assert info["split_differs"]  # attention heads of different ranks drop different elements
    assert info["residual_differs"] is sp  # the residual stream is split only under SP
    assert info["after_equal"]
    assert info["replayed"]  # checkpointing recomputes with the same masks: identical gradients
    assert info["hidden_shape"] == ((2, 8, 32) if sp else (2, 16, 32))


def low_precision_case(layout: tuple[str, ...], precision: str) -> None:
    """16-bit parameters (fp32 master weights and reductions) in a tensor/pipeline layout against torch
    FSDP2 with the same mixed precision (and ShardedGradScaler for fp16), over torch's DTensor tensor
    parallelism where the layout has tp. The bound is the reference's own drift when only the micro-batch
    size changes, times LOW_PRECISION_NOISE_FACTOR (tests/tolerances.py)."""
    world = dist.get_world_size()
    overrides = ("model.n_layers=4", f"train.precision={precision}", "train.steps=8")
    cfg = tiny_config(world, *layout, *overrides)
    p = cfg.parallel
    ours = dtrain_run(cfg, harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp))
    # The reference runs our micro-batch shapes (a pipeline then agrees to ~1e-7: it changes no
    # arithmetic); the noise is FSDP2 with a quarter of them.
    tensor_parallel = tuple(o for o in layout if o.startswith(("parallel.tp=", "parallel.sp=")))
    assert_within_fsdp2_noise(ours, world, overrides, cfg.train.micro_batch_size, tensor_parallel)


LOW = {
    "tp2-sp-bf16": (("parallel.tp=2", "parallel.sp=true"), "bf16"),
    "cp2-bf16": (("parallel.cp=2",), "bf16"),
    "tp2-fp16": (("parallel.tp=2",), "fp16"),
    "pp2-1f1b-bf16": (("parallel.pp=2",), "bf16"),
    "pp2-interleaved-fp16": (
        ("parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2"),
        "fp16",
    ),
}


@pytest.mark.parametrize(("layout", "precision"), _default_or_slow(LOW, "tp2-sp-bf16"))
def test_low_precision_layouts_match_torch_fsdp2(world2, layout, precision):
    world2.run(low_precision_case, layout, precision)

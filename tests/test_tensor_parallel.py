"""Tensor and sequence parallelism: whole-model training equal to torch DDP on the unsharded model, in
float64 (every parameter, to 1e-10) and in fp32 (losses and gradient norms, to 1e-5); see
tests/tolerances.py for why both."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import harness
from tests.reference import dtrain_run, float64, tiny_config, torch_ddp_run
from tests.test_data_parallel import compare
from tests.tolerances import FP32, FP64


def tp_training_case(tp: int, sp: bool, overrides: tuple[str, ...]) -> list[float]:
    world = dist.get_world_size()
    layout = (f"parallel.tp={tp}", f"parallel.sp={str(sp).lower()}")
    cfg = tiny_config(world, *layout, *overrides)
    grid = harness.grid(tp=cfg.parallel.tp, dp=cfg.parallel.dp)
    with float64():
        # The reference: torch DDP over every rank on the unsharded model, same global batch.
        compare(dtrain_run(cfg, grid), torch_ddp_run(tiny_config(world, *overrides)), FP64)
    ours, ref = dtrain_run(cfg, grid), torch_ddp_run(tiny_config(world, *overrides))
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), **FP32)
    torch.testing.assert_close(torch.tensor(ours["grad_norms"]), torch.tensor(ref["grad_norms"]), **FP32)
    return ours["losses"]


CASES = {
    "tp2": (2, False, ()),
    "tp2-sp": (2, True, ()),
    "tp2-sp-tied-odd-vocab": (2, True, ("model.tie_embeddings=true", "model.vocab_size=95")),
    "tp2-kv1-ckpt": (2, False, ("model.n_kv_heads=1", "train.activation_checkpointing=true")),
}


@pytest.mark.parametrize(("tp", "sp", "overrides"), CASES.values(), ids=CASES.keys())
def test_tp_matches_torch_ddp_2_ranks(world2, tp, sp, overrides):
    losses = world2.run(tp_training_case, tp, sp, overrides)[0]
    assert losses[-1] < losses[0]


CASES_4 = {
    "tp4": (4, False, ("model.n_kv_heads=4",)),
    "tp4-sp-kv2-odd-vocab": (4, True, ("model.vocab_size=94",)),
    "tp2-dp2": (2, False, ()),
    "tp2-dp2-sp-accumulate-tied": (2, True, ("train.global_batch_size=32", "model.tie_embeddings=true")),
}


@pytest.mark.parametrize(("tp", "sp", "overrides"), CASES_4.values(), ids=CASES_4.keys())
def test_tp_matches_torch_ddp_4_ranks(world4, tp, sp, overrides):
    world4.run(tp_training_case, tp, sp, overrides)

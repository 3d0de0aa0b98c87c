"""The GradSync implementations of parallel/ around a model none of us wrote the training of: a plain
torch MLP, trained in a loop that only uses the interface, against torch DistributedDataParallel with
torch's AdamW and clip_grad_norm_ (float64, per-tensor 2-norm within FP64), and what they hold: on the
meta device with placeholder groups exactly what the real objects hold."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.data_parallel import DataParallelAdamW, torch_adamw
from parallel.grad_sync import AdamWConfig, clip_
from parallel.grid import MetaGroup
from parallel.zero import ZeroDataParallel, plan_zero_buckets
from parallel.zero3 import zero3
from tests.tolerances import FP64

ADAMW = AdamWConfig(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ROWS, MICRO, STEPS, MAX_NORM = 16, 2, 4, 0.5


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(ROWS, 6, generator=g), torch.randn(ROWS, 3, generator=g)


def my_microbatches(step: int):
    """This rank's rows of the global batch, in micro-batches of MICRO rows."""
    x, y = batch(step)
    n, r = dist.get_world_size(), dist.get_rank()
    per = ROWS // n
    x, y = x[r * per : (r + 1) * per], y[r * per : (r + 1) * per]
    return [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, per, MICRO)]


def loss_of(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum() / ROWS  # over the global batch, so rank and micro-batch sums add up


def build(mode: str, model: nn.Sequential, group):
    params = list(model.parameters())
    if mode == "ddp":
        return DataParallelAdamW(model, group, 0.0005, ADAMW)
    if mode.startswith("zero3"):
        units = [
            (list(layer.parameters()), [(layer, layer)]) for layer in model if isinstance(layer, nn.Linear)
        ]
        return zero3(units, group, ADAMW, "all" if mode.endswith("offload") else "none")
    stage = int(mode[4])
    plan = plan_zero_buckets(params, 256)  # a few small buckets, padded to a multiple of the group
    return ZeroDataParallel(plan, group, stage, ADAMW, offload=mode.endswith("offload"))


def train_case(mode: str) -> dict:
    torch.set_default_dtype(torch.float64)
    try:
        ours_model, ref_model = mlp(), mlp()
        sync = build(mode, ours_model, dist.group.WORLD)
        ref = DistributedDataParallel(ref_model)
        ref_opt = torch_adamw(list(ref_model.parameters()), ADAMW)
        worst = 0.0
        for step in range(STEPS):
            mbs = my_microbatches(step)
            ours_loss = torch.zeros(())
            for i, (x, y) in enumerate(mbs):
                sync.before_backward(i == len(mbs) - 1)
                loss = loss_of(ours_model, x, y)
                loss.backward()
                ours_loss += loss.detach()
            sync.finish_grad_sync()
            norm = sync.grad_norm()
            clip_(sync, MAX_NORM, norm)
            sync.step(ADAMW.lr)
            sync.zero_grad()
            # torch DDP averages gradients over the n ranks where ours sums them (the loss already has the
            # global denominator), so its loss is n times ours for the same gradient.
            n = dist.get_world_size()
            for i, (x, y) in enumerate(mbs):
                if i < len(mbs) - 1:
                    with ref.no_sync():
                        (loss_of(ref, x, y) * n).backward()
                else:
                    (loss_of(ref, x, y) * n).backward()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_NORM)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            worst = max(worst, abs(float(norm) - float(ref_norm)) / float(ref_norm))
        with sync.params_whole():
            ours = [p.detach().clone() for p in ours_model.parameters()]
        for a, b in zip(ours, ref_model.parameters(), strict=True):
            b = b.detach()
            worst = max(worst, float((a - b).norm() / b.norm()))
        start = list(mlp().parameters())
        moved = min(float((a - b).norm() / b.norm()) for a, b in zip(ours, start, strict=True))
        return {"worst": worst, "moved": moved}
    finally:
        torch.set_default_dtype(torch.float32)


MODES = ["ddp", "zero1", "zero2", "zero1-offload", "zero3", "zero3-offload"]


@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_ddp_2_ranks(world2, mode):
    for result in world2.run(train_case, mode):
        assert result["worst"] <= FP64["rtol"], result
        assert result["moved"] > 1e-3, result  # every tensor was really trained


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_matches_torch_ddp_4_ranks(world4, mode):
    for result in world4.run(train_case, mode):
        assert result["worst"] <= FP64["rtol"], result


def held_case(mode: str) -> tuple[dict, dict]:
    """(what the real object holds, what the same construction holds on the meta device)."""
    real = build(mode, mlp(), dist.group.WORLD).held_bytes()
    with torch.device("meta"):
        model = mlp()
    group = MetaGroup(tuple(range(dist.get_world_size())), dist.get_rank())
    return real, build(mode, model, group).held_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_meta_construction_holds_what_the_real_one_holds(world2, mode):
    for real, meta in world2.run(held_case, mode):
        assert real == meta
        assert sum(real["device"].values()) + sum(real["host"].values()) > 0

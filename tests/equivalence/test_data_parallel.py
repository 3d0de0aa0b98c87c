"""Our hand-written DDP against torch's DistributedDataParallel and against one process on the full
batch: per-step loss, gradient norm and final parameters."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import harness
from tests.reference import (
    compare_runs,
    dtrain_run,
    single_process_run,
    tiny_config,
    torch_ddp_run,
    torch_fsdp2_run,
)
from tests.tolerances import FP32, LOW_PRECISION


def equivalence_case(overrides: tuple[str, ...]) -> list[float]:
    world = dist.get_world_size()
    cfg = tiny_config(world, *overrides)
    ours = dtrain_run(cfg, harness.grid(dp=world))
    fp32 = cfg.train.precision == "fp32"
    tol = FP32 if fp32 else LOW_PRECISION[cfg.train.precision]
    # Two ranks sum gradients exactly as torch DDP does, so fp32 must agree to the bit there. 16-bit
    # parameters with fp32 masters are torch FSDP2's mixed precision (param_dtype 16-bit, fp32 reduction).
    reference = torch_ddp_run if fp32 else torch_fsdp2_run
    compare_runs(ours, reference(tiny_config(world, *overrides)), None if fp32 and world == 2 else tol)
    if cfg.train.precision == "fp32" and dist.get_rank() == 0:
        compare_runs(ours, single_process_run(tiny_config(1, *overrides, "parallel.dp=1")), FP32)
    # Every rank must hold the same parameters after the steps (the reduction reached all of them).
    flat = torch.cat([p.flatten() for p in ours["params"].values()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    return ours["losses"]


CASES_2 = {
    "accumulate-2-many-buckets": ("parallel.bucket_mb=0.001",),
    "accumulate-2-one-bucket": ("parallel.bucket_mb=100",),
    "no-accumulation": ("train.global_batch_size=8",),
    "tied-embeddings": ("model.tie_embeddings=true", "parallel.bucket_mb=0.004"),
    "no-clipping-ckpt": ("train.grad_clip=0", "train.activation_checkpointing=true"),
    "bf16": ("train.precision=bf16", "train.steps=8"),
    "fp16": ("train.precision=fp16", "train.steps=8"),
    "bf16-grads-bf16": ("train.precision=bf16", "parallel.grad_dtype=bf16", "train.steps=8"),
}


@pytest.mark.parametrize("overrides", CASES_2.values(), ids=CASES_2.keys())
def test_matches_torch_ddp_2_ranks(world2, overrides):
    losses = world2.run(equivalence_case, overrides)[0]
    assert losses[-1] < losses[0]  # the comparison is between runs that actually learn


CASES_4 = {
    "accumulate-2-many-buckets": ("train.global_batch_size=32", "parallel.bucket_mb=0.002"),
    "no-accumulation": ("parallel.bucket_mb=0.01",),
}


@pytest.mark.parametrize("overrides", CASES_4.values(), ids=CASES_4.keys())
def test_matches_torch_ddp_4_ranks(world4, overrides):
    world4.run(equivalence_case, overrides)


def overlap_case() -> dict:
    """Record when each bucket's all-reduce starts relative to the gradient hooks of one backward."""
    from parallel.data_parallel import DataParallel

    cfg = tiny_config(dist.get_world_size(), "parallel.bucket_mb=0.002")
    g = harness.grid(dp=dist.get_world_size())
    from dtrain.model import Transformer, init_weights

    model = Transformer(cfg.model)
    init_weights(model, 0)
    ddp = DataParallel(model, g.dp_group, bucket_mb=cfg.parallel.bucket_mb)
    n_params = sum(1 for _ in model.parameters())
    fired, launches = [0], []
    original_launch = ddp._launch

    def recording_launch(bucket):
        launches.append(fired[0])
        original_launch(bucket)

    def count(_):  # registered after DataParallel's own hook, so it counts the gradients finished before
        fired[0] += 1

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count)
    ddp._launch = recording_launch
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    with ddp.no_sync():
        ddp(x, x).backward()
    during_no_sync, fired[0] = len(launches), 0
    ddp(x, x).backward()
    ddp.finish_grad_sync()
    return {
        "buckets": len(ddp.buckets),
        "n_params": n_params,
        "no_sync": during_no_sync,
        "launches": launches,
    }


def test_buckets_overlap_backward_and_skip_non_final_microbatches(world2):
    info = world2.run(overlap_case)[0]
    assert info["buckets"] > 4
    assert info["no_sync"] == 0
    assert len(info["launches"]) == info["buckets"]
    # The first all-reduce starts while most gradients are still to come: communication overlaps backward.
    assert info["launches"][0] < info["n_params"] // 2
    assert info["launches"] == sorted(info["launches"])


def fp16_skip_case() -> dict:
    """An overflow on one rank only: every rank must skip the step and halve the scale."""
    world = dist.get_world_size()
    cfg = tiny_config(world, "train.precision=fp16", "train.steps=2")
    from dtrain.trainer import Trainer

    trainer = Trainer(cfg, harness.grid(dp=world), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    handle = None
    if dist.get_rank() == 1:
        handle = trainer.model.chunks[0].blocks["0"].attn.wq.weight.register_hook(lambda g: g * float("inf"))
    first = trainer.train_step()
    if handle is not None:
        handle.remove()
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    scale_after_skip = trainer.scaler.scale
    second = trainer.train_step()
    return {"skipped": [first.skipped, second.skipped], "unchanged": unchanged, "scale": scale_after_skip}


def test_fp16_overflow_on_one_rank_is_skipped_by_all(world2):
    for info in world2.run(fp16_skip_case):
        assert info["skipped"] == [True, False]
        assert info["unchanged"]
        assert info["scale"] == 2.0**15


def test_plan_buckets():
    from parallel.data_parallel import plan_buckets

    assert plan_buckets([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert plan_buckets([4, 20, 4], 8) == [[0], [1], [2]]  # an oversized parameter gets its own bucket
    assert plan_buckets([1, 1, 1], 100) == [[0, 1, 2]]


def double_backward_case(zero: int) -> str:
    from dtrain.model import Transformer, init_weights
    from parallel.data_parallel import DataParallel
    from parallel.grad_sync import AdamWConfig
    from parallel.zero import ZeroDataParallel, plan_zero_buckets

    cfg = tiny_config(dist.get_world_size())
    model = Transformer(cfg.model)
    init_weights(model, 0)
    group = harness.grid(dp=dist.get_world_size()).dp_group
    if zero == 0:
        ddp = DataParallel(model, group, bucket_mb=100)
    else:  # ZeRO-1 and 2 have hooks and a check of their own
        plan = plan_zero_buckets(list(model.parameters()), 100 * 2**20)
        ddp = ZeroDataParallel(plan, group, zero, AdamWConfig(1e-3, (0.9, 0.999), 1e-8, 0.0), False)
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    model(x, x).backward()
    try:
        model(x, x).backward()  # a second synchronising backward without finish_grad_sync
    except RuntimeError as e:
        return str(e)
    finally:
        ddp.finish_grad_sync()
    return "no error"


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_second_backward_without_sync_is_refused(world2, zero):
    assert "became final twice" in world2.run(double_backward_case, zero)[0]

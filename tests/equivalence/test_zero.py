"""ZeRO stages 1 and 2, with and without optimizer offload: training equal to torch DDP, memory held per
rank as the ZeRO paper says, and checkpoints that resume at another data-parallel size and stage."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from parallel.precision import DTYPES
from tests import harness
from tests.reference import (
    compare_runs,
    dtrain_run,
    layout_matches_ddp,
    relative_errors,
    tiny_config,
    torch_fsdp2_run,
)
from tests.tolerances import FP64, LOW_PRECISION


def zero_case(layout: tuple[str, ...], overrides: tuple[str, ...]) -> dict:
    """float64 (all to 1e-10) and fp32 losses/grad norms via layout_matches_ddp, plus fp32 parameters:
    ZeRO keeps the arithmetic of DDP except the norm, summed from shards, so they agree to 1e-5 too."""
    return layout_matches_ddp(layout, overrides, fp32_parameters=True)


CASES = {
    f"zero{stage}-{offload}-{'accumulate' if accumulate else 'single'}": (
        (
            f"parallel.zero={stage}",
            f"parallel.offload={offload}",
            f"train.global_batch_size={16 if accumulate else 8}",
        ),
        ("parallel.bucket_mb=0.004",),  # several buckets, each padded to a multiple of dp
    )
    for stage, offload, accumulate in itertools.product((1, 2), ("none", "optimizer"), (True, False))
}


@pytest.mark.parametrize(("layout", "overrides"), CASES.values(), ids=CASES.keys())
def test_zero_matches_torch_ddp_2_ranks(world2, layout, overrides):
    losses = world2.run(zero_case, layout, overrides)[0]["losses"]
    assert losses[-1] < losses[0]


CASES_3 = {
    f"zero3-{offload}-{'accumulate' if accumulate else 'single'}": (
        (
            "parallel.zero=3",
            f"parallel.offload={offload}",
            f"train.global_batch_size={16 if accumulate else 8}",
        ),
        (),
    )
    for offload, accumulate in itertools.product(("none", "optimizer", "all"), (True, False))
}
CASES_3["zero3-tied-checkpointing"] = (
    ("parallel.zero=3",),
    ("model.tie_embeddings=true", "train.activation_checkpointing=true"),
)


@pytest.mark.parametrize(("layout", "overrides"), CASES_3.values(), ids=CASES_3.keys())
def test_zero3_matches_torch_ddp_2_ranks(world2, layout, overrides):
    losses = world2.run(zero_case, layout, overrides)[0]["losses"]
    assert losses[-1] < losses[0]


CASES_4 = {
    "zero1-accumulate": (("parallel.zero=1", "train.global_batch_size=32"), ("parallel.bucket_mb=0.002",)),
    "zero2-offload": (("parallel.zero=2", "parallel.offload=optimizer"), ("model.tie_embeddings=true",)),
    "zero2-accumulate-clip": (("parallel.zero=2", "train.global_batch_size=32"), ("train.grad_clip=0.05",)),
    "zero3-offload-all-tied": (("parallel.zero=3", "parallel.offload=all"), ("model.tie_embeddings=true",)),
}


@pytest.mark.parametrize(("layout", "overrides"), CASES_4.values(), ids=CASES_4.keys())
def test_zero_matches_torch_ddp_4_ranks(world4, layout, overrides):
    world4.run(zero_case, layout, overrides)


def _dp4_matrix() -> dict:
    """Every stage x offload x accumulation at dp=4, less the cases the default run covers."""
    cases = {}
    for stage, offload, accumulate in itertools.product(
        (1, 2, 3), ("none", "optimizer", "all"), (True, False)
    ):
        if offload == "all" and stage != 3:
            continue
        batch = f"train.global_batch_size={32 if accumulate else 16}"
        name = f"zero{stage}-{offload}-{'accumulate' if accumulate else 'single'}"
        cases[name] = (
            (f"parallel.zero={stage}", f"parallel.offload={offload}", batch),
            ("parallel.bucket_mb=0.004",),
        )
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "overrides"), _dp4_matrix().values(), ids=_dp4_matrix().keys())
def test_zero_full_matrix_4_ranks(world4, layout, overrides):
    world4.run(zero_case, layout, overrides)


def low_precision_case(stage: int, precision: str, extra: tuple[str, ...] = ()) -> dict:
    """16-bit parameters with sharded fp32 masters against torch FSDP2's mixed precision (16-bit
    param_dtype, reduce_dtype the same as parallel.grad_dtype), same micro-batch shapes, so the
    LOW_PRECISION bounds apply (tests/tolerances.py); fp16 also exercises loss scaling on sharded
    gradients against torch's ShardedGradScaler. Every rank holds 16-bit parameters, and the checkpoint
    weights are the fp32 masters."""
    world = dist.get_world_size()
    overrides = (f"train.precision={precision}", "train.steps=8", *extra)
    cfg = tiny_config(world, f"parallel.zero={stage}", *overrides)
    ours = dtrain_run(cfg, harness.grid(dp=world))
    reference = torch_fsdp2_run(tiny_config(world, *(o for o in overrides if "offload" not in o)))
    compare_runs(ours, reference, LOW_PRECISION[precision])
    trainer = ours["trainer"]
    assert {p.dtype for p in trainer.params} == {DTYPES[precision]}
    assert {v.dtype for v in ours["params"].values()} == {torch.float32}
    return relative_errors(ours, reference)


LOW = {
    "zero1-bf16": (1, "bf16", ()),
    "zero2-bf16": (2, "bf16", ()),
    "zero3-bf16": (3, "bf16", ()),
    "zero2-fp16": (2, "fp16", ()),
    "zero3-fp16": (3, "fp16", ()),
    "zero1-bf16-grads-bf16": (1, "bf16", ("parallel.grad_dtype=bf16",)),
}
LOW_SLOW = {
    "zero2-bf16-grads-bf16": (2, "bf16", ("parallel.grad_dtype=bf16",)),
    "zero3-bf16-offload-all": (3, "bf16", ("parallel.offload=all",)),
    "zero1-bf16-offload-optimizer": (1, "bf16", ("parallel.offload=optimizer",)),
    "zero3-bf16-tied-checkpointing": (
        3,
        "bf16",
        ("model.tie_embeddings=true", "train.activation_checkpointing=true"),
    ),
}


@pytest.mark.parametrize(("stage", "precision", "extra"), LOW.values(), ids=LOW.keys())
def test_zero_low_precision_matches_torch_fsdp2(world2, stage, precision, extra):
    world2.run(low_precision_case, stage, precision, extra)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision", "extra"), LOW_SLOW.values(), ids=LOW_SLOW.keys())
def test_zero_low_precision_variants_match_torch_fsdp2(world2, stage, precision, extra):
    world2.run(low_precision_case, stage, precision, extra)


def memory_case(stage: int, offload: str) -> dict:
    from dtrain.model import count_params
    from dtrain.trainer import Trainer

    world = dist.get_world_size()
    cfg = tiny_config(
        world, f"parallel.zero={stage}", f"parallel.offload={offload}", "model.d_model=64", "train.steps=1"
    )
    trainer = Trainer(cfg, harness.grid(dp=world), torch.device("cpu"))
    trainer.train_step()  # optimizer state exists after the first step
    return {"held": trainer.held_bytes(), "params": count_params(cfg.model)["total"]}


# Bytes per parameter for fp32 AdamW (docs/formulas.md, ZeRO paper): params + grads + optimizer states.
EXPECTED = {
    0: lambda n: (4, 4, 8),
    1: lambda n: (4, 4, 8 / n),
    2: lambda n: (4, 4 / n, 8 / n),
    3: lambda n: (4 / n, 4 / n, 8 / n),
}


@pytest.mark.parametrize(
    ("stage", "offload"),
    [
        (0, "none"),
        (1, "none"),
        (2, "none"),
        (3, "none"),
        (1, "optimizer"),
        (2, "optimizer"),
        (3, "optimizer"),
        (3, "all"),
    ],
)
def test_memory_held_matches_the_zero_paper(world4, stage, offload):
    for info in world4.run(memory_case, stage, offload):
        held, n_params = info["held"], info["params"]
        params, grads, optimizer = (b * n_params for b in EXPECTED[stage](4))
        if offload != "none":
            optimizer *= 1.5  # moments plus the fp32 master copy of the shard, all in host memory
            assert held["device"]["optimizer"] == 0
        where = "host" if offload != "none" else "device"
        params_where = "host" if offload == "all" else "device"  # offload=all: parameter shards too
        measured = (held[params_where]["params"], held["device"]["grads"], held[where]["optimizer"])
        for what, got, want in zip(
            ("params", "grads", "optimizer"), measured, (params, grads, optimizer), strict=True
        ):
            assert want <= got <= want * 1.02, (what, got, want)  # padding to a multiple of dp only adds


def fit_case(layout: tuple[str, ...], *overrides: str) -> list[tuple[int, float]]:
    from dtrain.trainer import Trainer
    from tests.reference import float64

    world = dist.get_world_size()
    with float64():
        cfg = tiny_config(world, *layout, *overrides)
        records = Trainer(cfg, harness.grid(dp=world), torch.device("cpu")).fit()
    return [(r["step"], r["loss"]) for r in records]


RESUME = {
    "zero1-dp2-to-zero2-dp4": (2, ("parallel.zero=1",), 4, ("parallel.zero=2", "parallel.offload=optimizer")),
    "zero2-dp4-to-ddp-dp2": (4, ("parallel.zero=2",), 2, ()),
    "ddp-dp2-to-zero1-dp4": (2, (), 4, ("parallel.zero=1",)),
    "zero3-offload-all-dp2-to-zero3-dp4": (
        2,
        ("parallel.zero=3", "parallel.offload=all"),
        4,
        ("parallel.zero=3",),
    ),
}


@pytest.mark.parametrize(("save_world", "save", "resume_world", "resume"), RESUME.values(), ids=RESUME.keys())
def test_sharded_state_resumes_at_another_dp_and_stage(
    world2, world4, tmp_path, save_world, save, resume_world, resume
):
    """Save after 4 steps in one layout, resume in another (another world size, hence dp) for 2 more, and
    compare with 6 uninterrupted steps in the second layout (float64, 1e-10)."""
    worlds = {2: world2, 4: world4}
    steps = ("train.steps=6", "run.keep_checkpoints=0")
    worlds[save_world].run(fit_case, save, f"run.out_dir={tmp_path}/a", "run.ckpt_every=4", *steps)
    resume_from = f"run.resume={tmp_path}/a/checkpoints/step_4"
    resumed = worlds[resume_world].run(fit_case, resume, f"run.out_dir={tmp_path}/b", resume_from, *steps)[0]
    straight = worlds[resume_world].run(fit_case, resume, f"run.out_dir={tmp_path}/c", *steps)[0]
    assert [s for s, _ in resumed] == [5, 6]
    got = torch.tensor([loss for _, loss in resumed], dtype=torch.float64)
    want = torch.tensor([loss for s, loss in straight if s > 4], dtype=torch.float64)
    torch.testing.assert_close(got, want, **FP64)


def peak_gathered_case(pp: int = 1) -> dict:
    """During a ZeRO-3 step the whole parameters of at most two units exist at once: the one running and
    the one prefetched."""
    from dtrain.trainer import Trainer

    world = dist.get_world_size()
    cfg = tiny_config(world, "parallel.zero=3", "model.n_layers=4", "train.steps=2", f"parallel.pp={pp}")
    trainer = Trainer(cfg, harness.grid(pp=pp, dp=world // pp), torch.device("cpu"))
    observed = []  # units gathered, sampled whenever a gather starts
    residency = trainer.grad_sync.residency
    original = residency._start_gather

    def counting(bucket):
        original(bucket)
        observed.append(len(residency.gathered))

    residency._start_gather = counting
    trainer.train_step()
    trainer.train_step()
    return {"max": max(observed), "units": len(trainer.grad_sync.buckets), "after": trainer.held_bytes()}


def test_zero3_holds_at_most_the_current_and_prefetched_unit(world2):
    info = world2.run(peak_gathered_case)[0]
    assert info["units"] == 6  # embedding, 4 blocks, final norm + head
    assert info["max"] <= 2


def test_zero3_under_pipelining_holds_at_most_two_units(world4):
    """A pipeline stage's last backward, split into input and weight passes elsewhere, runs whole here:
    units are freed once their weights have gradients, so a weight pass after the input pass would hold
    every unit of the stage at once."""
    info = world4.run(peak_gathered_case, 2)
    assert [i["units"] for i in info] == [3, 3, 3, 3]  # embedding + 2 blocks, 2 blocks + norm and head
    assert max(i["max"] for i in info) <= 2

"""Checkpoints: a resumed run repeats the uninterrupted one bit for bit; corrupted or partial checkpoints
are detected; retention; loading refuses another model shape."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from dtrain import checkpoint
from tests import harness
from tests.reference import float64, tiny_config
from tests.tolerances import FP64


def _fit(*overrides: str):
    from dtrain.trainer import Trainer

    cfg = tiny_config(dist.get_world_size(), *overrides)
    trainer = Trainer(cfg, harness.grid(dp=dist.get_world_size()), torch.device("cpu"))
    # The weights as checkpoints hold them: the fp32 masters of 16-bit parameters.
    return trainer.fit(), trainer.canonical_state()


def _rank0(fn) -> None:
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def resume_case(out_dir: str, precision: str, layout: tuple[str, ...] = ()) -> dict:
    common = (f"run.out_dir={out_dir}", "train.steps=6", "run.ckpt_every=2", "run.keep_checkpoints=0")
    common += (f"train.precision={precision}", "model.dropout=0.1", *layout)  # dropout: the RNG resumes too
    full, full_params_ = _fit(*common)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        logged_full = [json.loads(line) for line in f]
    # Crash after step 4: the checkpoint of step 6 never happened.
    _rank0(lambda: shutil.rmtree(os.path.join(out_dir, "checkpoints", "step_6")))
    resumed, resumed_params = _fit(*common, "run.resume=true")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        logged_resumed = [json.loads(line) for line in f]
    # An explicit folder from the same run resumes too.
    explicit, _ = _fit(*common, f"run.resume={out_dir}/checkpoints/step_2")
    return {
        "full": [(r["step"], r["loss"], r["grad_norm"]) for r in full],
        "resumed": [(r["step"], r["loss"], r["grad_norm"]) for r in resumed],
        "explicit": [(r["step"], r["loss"], r["grad_norm"]) for r in explicit],
        "params_equal": all(torch.equal(full_params_[n], resumed_params[n]) for n in full_params_),
        "logged": [(r["step"], r["loss"]) for r in logged_full]
        == [(r["step"], r["loss"]) for r in logged_resumed],
    }


RESUME = {
    "fp32": ("fp32", ()),
    "fp16": ("fp16", ()),
    "bf16-zero3": ("bf16", ("parallel.zero=3",)),  # sharded fp32 masters, 16-bit parameter shards
}


@pytest.mark.parametrize(("precision", "layout"), RESUME.values(), ids=RESUME.keys())
def test_resume_is_bit_identical(world2, tmp_path, precision, layout):
    info = world2.run(resume_case, str(tmp_path / "run"), precision, layout)[0]
    assert [s for s, _, _ in info["full"]] == [1, 2, 3, 4, 5, 6]
    assert info["resumed"] == info["full"][4:]  # exact float equality of loss and grad norm
    assert info["explicit"] == info["full"][2:]
    assert info["params_equal"]
    assert info["logged"]  # metrics.jsonl reads as one uninterrupted run


def masters_case(out_dir: str) -> dict:
    """bf16 under ZeRO-1: the checkpoint's weights are the fp32 masters, and the 16-bit parameters the
    run computes with are those masters rounded to nearest."""
    from dtrain.trainer import Trainer

    cfg = tiny_config(
        dist.get_world_size(),
        f"run.out_dir={out_dir}",
        "train.steps=2",
        "run.ckpt_every=2",
        "train.precision=bf16",
        "parallel.zero=1",
    )
    trainer = Trainer(cfg, harness.grid(dp=dist.get_world_size()), torch.device("cpu"))
    trainer.fit()
    saved = checkpoint.load_parts(os.path.join(out_dir, "checkpoints", "step_2"), "model")
    masters = trainer.canonical_state()
    live = dict(trainer.model.named_parameters())
    return {
        "dtypes": {v.dtype for v in saved.values()},
        "saved_are_masters": all(torch.equal(saved[n], masters[n]) for n in masters),
        "live_are_rounded": all(torch.equal(saved[n].to(torch.bfloat16), live[n].detach()) for n in live),
    }


def test_16_bit_checkpoint_holds_the_fp32_masters(world2, tmp_path):
    for info in world2.run(masters_case, str(tmp_path / "run")):
        assert info == {"dtypes": {torch.float32}, "saved_are_masters": True, "live_are_rounded": True}


def corruption_case(out_dir: str) -> dict:
    _fit(f"run.out_dir={out_dir}", "train.steps=4", "run.ckpt_every=2", "run.keep_checkpoints=0")
    ckpts = checkpoint.list_checkpoints(out_dir)
    out = {"names": [os.path.basename(c) for c in ckpts]}
    if dist.get_rank() == 0:
        newest = ckpts[-1]
        with open(os.path.join(newest, "model_pp0.pt"), "r+b") as f:  # truncate: a torn write
            f.truncate(100)
        try:
            checkpoint.verify(newest)
        except checkpoint.CheckpointError as e:
            out["error"] = str(e)
        warnings = []
        out["fallback"] = os.path.basename(checkpoint.latest_valid(out_dir, warn=warnings.append))
        out["warnings"] = warnings
        os.makedirs(os.path.join(out_dir, "checkpoints", "step_9.tmp"))  # an interrupted save
        out["after_tmp"] = [os.path.basename(c) for c in checkpoint.list_checkpoints(out_dir)]
    dist.barrier()
    # A resume picks the newest valid checkpoint, here step 2, and continues from it.
    records, _ = _fit(f"run.out_dir={out_dir}", "train.steps=4", "run.resume=true")
    out["resumed_steps"] = [r["step"] for r in records]
    return out


def test_corrupted_checkpoint_is_detected_and_skipped(world2, tmp_path):
    info = world2.run(corruption_case, str(tmp_path / "run"))[0]
    assert info["names"] == ["step_2", "step_4"]
    assert "model_pp0.pt does not match its checksum" in info["error"]
    assert info["fallback"] == "step_2"
    assert len(info["warnings"]) == 1 and "step_4" in info["warnings"][0]
    assert info["after_tmp"] == ["step_2", "step_4"]
    assert info["resumed_steps"] == [3, 4]


def retention_and_shape_case(out_dir: str) -> dict:
    _fit(f"run.out_dir={out_dir}", "train.steps=5", "run.ckpt_every=1", "run.keep_checkpoints=2")
    kept = [os.path.basename(c) for c in checkpoint.list_checkpoints(out_dir)]
    try:
        _fit(f"run.out_dir={out_dir}", "train.steps=6", "model.d_model=48", "run.resume=true")
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    return {"kept": kept, "error": error}


def test_retention_and_other_model_shape(world2, tmp_path):
    info = world2.run(retention_and_shape_case, str(tmp_path / "run"))[0]
    assert info["kept"] == ["step_4", "step_5"]
    assert "another model shape" in info["error"]


def test_checkpoint_holds_no_pickled_code(tmp_path):
    """weights_only loading refuses a file that would run code when unpickled."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "model.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="holds pickled objects other than tensors"):
        checkpoint.load_tensors(str(tmp_path), "model.pt")


def reshard_case(out_dir: str, save_layout: tuple[str, ...], resume_layout: tuple[str, ...]) -> dict:
    """Train 4 steps in one layout (parallel.* overrides) and save; resume in another for 2 more;
    compare with 6 uninterrupted steps in the second layout. In float64, so layouts agree to rounding."""
    from dtrain.trainer import Trainer

    world = dist.get_world_size()
    model = ("model.n_layers=4", "model.tie_embeddings=true")

    def fit(layout, *overrides):
        cfg = tiny_config(world, *model, *layout, *overrides)
        p = cfg.parallel
        grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, dp_shard=p.dp_shard)
        return Trainer(cfg, grid, torch.device("cpu")).fit()

    with float64():
        fit(
            save_layout,
            f"run.out_dir={out_dir}/a",
            "train.steps=6",
            "run.ckpt_every=4",
            "run.keep_checkpoints=0",
        )
        step_4 = f"run.resume={out_dir}/a/checkpoints/step_4"
        resumed = fit(resume_layout, f"run.out_dir={out_dir}/b", "train.steps=6", step_4)
        straight = fit(resume_layout, f"run.out_dir={out_dir}/c", "train.steps=6")
    return {
        "resumed": [(r["step"], r["loss"]) for r in resumed],
        "straight": [(r["step"], r["loss"]) for r in straight],
    }


TP2, TP2_SP, TP4_SP = (
    ("parallel.tp=2",),
    ("parallel.tp=2", "parallel.sp=true"),
    ("parallel.tp=4", "parallel.sp=true"),
)
PP2, PP4 = ("parallel.pp=2",), ("parallel.pp=4",)
MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.0")
PP2_INTERLEAVED = ("parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2")
RESHARD = {
    "tp2-to-tp1": (2, TP2, ()),
    "tp1-to-tp2sp": (2, (), TP2_SP),
    "tp4sp-to-tp2dp2": (4, TP4_SP, TP2),
    "pp2-to-tp2": (2, PP2, TP2),
    "pp4-to-pp2-interleaved-dp2": (4, PP4, PP2_INTERLEAVED),
    "tp2pp2-to-dp4": (4, (*TP2, *PP2), ()),
    # Experts are canonical (E, ...) tensors split over ep: any ep, tp or pp reads them.
    "moe-ep2dp4-to-ep4": (4, ("parallel.ep=2", *MOE), ("parallel.ep=4", *MOE)),
    "moe-ep2-to-tp2sp": (2, ("parallel.ep=2", *MOE), (*TP2_SP, *MOE)),
    "moe-ep2pp2-to-ep1": (4, ("parallel.ep=2", *PP2, *MOE), MOE),
    # Sharded optimizer state under model parallelism, resumed at another stage and layout.
    "zero3-tp2sp-to-zero1-pp2": (4, ("parallel.zero=3", *TP2_SP), ("parallel.zero=1", *PP2)),
    "zero2-pp2-moe-ep2-to-zero3-tp2": (
        4,
        ("parallel.zero=2", *PP2, "parallel.ep=2", *MOE),
        ("parallel.zero=3", *TP2, *MOE),
    ),
    # Hybrid sharding: optimizer state saved from shard groups of 2 (two replicas) is canonical, so it
    # resumes in groups of 4 (one replica), and back at another stage.
    "zero2-shard2-to-shard4": (4, ("parallel.zero=2", "parallel.dp_shard=2"), ("parallel.zero=2",)),
    "zero3-shard4-to-zero1-shard2": (4, ("parallel.zero=3",), ("parallel.zero=1", "parallel.dp_shard=2")),
    # Parameters and optimizer state are replicated over cp: one context rank writes them.
    "cp2-tp2-to-dp4": (4, ("parallel.cp=2", *TP2), ()),
    # LoRA: the checkpoint holds the adapters; the frozen base is rebuilt from the seed it names.
    "lora-zero3-tp2sp-to-zero1-pp2": (
        2,
        ("model.lora.rank=4", "model.lora.targets=[wq,wo,w2]", "parallel.zero=3", *TP2_SP),
        ("model.lora.rank=4", "model.lora.targets=[wq,wo,w2]", "parallel.zero=1", *PP2),
    ),
}


# Covered in kind by the cases above; the default run keeps one resume per kind of change.
SLOW_RESHARD = {
    "tp1-to-tp2sp",
    "tp4sp-to-tp2dp2",
    "tp2pp2-to-dp4",
    "moe-ep2pp2-to-ep1",
    "zero3-shard4-to-zero1-shard2",
    "cp2-tp2-to-dp4",
    "pp4-to-pp2-interleaved-dp2",
}


@pytest.mark.parametrize(
    ("world", "save", "resume"),
    [
        pytest.param(*v, id=k, marks=[pytest.mark.slow] if k in SLOW_RESHARD else [])
        for k, v in RESHARD.items()
    ],
)
def test_checkpoint_resumes_in_another_layout(world2, world4, tmp_path, world, save, resume):
    w = world2 if world == 2 else world4
    info = w.run(reshard_case, str(tmp_path), save, resume)[0]
    assert [s for s, _ in info["resumed"]] == [5, 6]
    resumed = torch.tensor([loss for _, loss in info["resumed"]], dtype=torch.float64)
    straight = torch.tensor([loss for s, loss in info["straight"] if s > 4], dtype=torch.float64)
    torch.testing.assert_close(resumed, straight, **FP64)

"""parallel.wrap around models none of us wrote (transformers' LlamaForCausalLM, torch's
TransformerEncoder), in a user's loop, against torch DistributedDataParallel with torch's AdamW and
clip_grad_norm_ in the same loop: every mode (DDP, ZeRO 1/2/3, offload of the optimizer or of everything,
accumulation, hybrid sharding), float64 to FP64, fp32 to FP32; bf16/fp16 (16-bit parameters, fp32
masters and gradients) against torch FSDP2 with the same MixedPrecisionPolicy and ShardedGradScaler, to
LOW_PRECISION; the bytes each rank holds, per the ZeRO formula; a ZeRO-3 checkpoint from 2 ranks resumed
at 4 and loaded into the plain model.

The two loops are the same user code: each rank's mean loss over its micro-batch divided by the number of
micro-batches, backward, step. torch DDP averages gradients over ranks; so does the wrapper."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from parallel.precision import DTYPES
from parallel.wrap import wrap
from tests.tolerances import FP32, FP64, LOW_PRECISION
from tests.unit.foreign_models import SEQ, VOCAB, build, loss_of, unit_classes

ADAMW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
MAX_NORM = 0.5  # below the gradient norms of these models, so clipping acts on every step
ROWS, STEPS = 8, 3  # rows of the global batch per step

MODES = {
    "ddp": {"zero": 0},
    "zero1": {"zero": 1},
    "zero2": {"zero": 2},
    "zero3": {"zero": 3},
    "zero1-offload": {"zero": 1, "offload": "optimizer"},
    "zero2-offload": {"zero": 2, "offload": "optimizer"},
    "zero3-offload": {"zero": 3, "offload": "optimizer"},
    "zero3-offload-all": {"zero": 3, "offload": "all"},
    # Hybrid sharding: shard groups of half the ranks, two replicas (parallel.grid's groups).
    "zero1-hybrid": {"zero": 1},
    "zero3-hybrid": {"zero": 3},
}


def options(kind: str, mode: str, model) -> dict:
    out = dict(MODES[mode])
    if out["zero"] == 3:
        out["units"] = [*unit_classes(kind), model]
    if mode.endswith("-hybrid"):
        from tests import harness

        world = dist.get_world_size()
        grid = harness.grid(dp=world, dp_shard=world // 2)
        out |= {"group": grid.dp_shard_group, "replica_group": grid.dp_replicate_group}
    return out


def micro_batches(step: int, accumulate: int) -> list[torch.Tensor]:
    """This rank's rows of the step's global batch, cut into `accumulate` micro-batches."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    per = ROWS // dist.get_world_size()
    mine = tokens[dist.get_rank() * per : (dist.get_rank() + 1) * per]
    return list(mine.chunk(accumulate))


def train_ours(kind, dp, accumulate, steps=range(STEPS)):
    losses, norms = [], []
    for step in steps:
        mbs = micro_batches(step, accumulate)
        total = 0.0
        for i, tokens in enumerate(mbs):
            with dp.no_sync(i < len(mbs) - 1):
                loss = loss_of(kind, dp, tokens) / len(mbs)
                dp.scale(loss).backward()
            total += float(loss.detach())
        result = dp.step()
        losses.append(total)
        norms.append(result.grad_norm)
    return losses, norms


def torch_adamw(model) -> torch.optim.AdamW:
    """torch's AdamW with the wrapper's rule: weight decay on parameters of two or more dimensions."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": ADAMW["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])


def train_torch(kind, model, opt, accumulate, steps=range(STEPS)):
    ddp = DistributedDataParallel(model)
    losses, norms = [], []
    for step in steps:
        mbs = micro_batches(step, accumulate)
        total = 0.0
        for i, tokens in enumerate(mbs):
            with ddp.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext():
                loss = loss_of(kind, ddp, tokens) / len(mbs)
                loss.backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms


def fsdp2(kind: str, model, precision: str):
    """torch FSDP2 around `model` with 16-bit mixed precision: every unit class and the root sharded,
    parameters all-gathered and computed in the 16-bit dtype (no autocast), gradients reduced in fp32
    into the fp32 shards AdamW steps."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for unit in [m for m in model.modules() if isinstance(m, tuple(unit_classes(kind)))]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def train_fsdp2(kind, model, opt, accumulate, precision, steps=range(STEPS)):
    """The user's loop under FSDP2: no_sync() is set_requires_gradient_sync(False), the fp16 loss scale
    torch's ShardedGradScaler (its overflow check agreed over the group)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    scaler = ShardedGradScaler("cpu", enabled=precision == "fp16")
    losses, norms = [], []
    for step in steps:
        mbs = micro_batches(step, accumulate)
        total = 0.0
        for i, tokens in enumerate(mbs):
            model.set_requires_gradient_sync(i == len(mbs) - 1)
            loss = loss_of(kind, model, tokens) / len(mbs)
            scaler.scale(loss).backward()
            total += float(loss.detach())
        scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).full_tensor()))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms


def whole(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 DTensor gathered whole (collective); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def train_case(kind: str, mode: str, accumulate: int, dtype: str = "float64", precision: str = "fp32"):
    dtype = getattr(torch, dtype)
    # fp32 arithmetic: the encoder without biases (see foreign_models.EncoderLM).
    overrides = {"bias": False} if kind == "encoder" and dtype != torch.float64 else {}
    model, ref_model = build(kind, dtype, **overrides), build(kind, dtype, **overrides)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    dp = wrap(
        model,
        **options(kind, mode, model),
        **ADAMW,
        max_grad_norm=MAX_NORM,
        precision=precision,
        bucket_mb=0.01,
    )
    if precision != "fp32":
        ref_model = fsdp2(kind, ref_model, precision)
    opt = torch_adamw(ref_model)
    losses, norms = train_ours(kind, dp, accumulate)
    if precision == "fp32":
        ref_losses, ref_norms = train_torch(kind, ref_model, opt, accumulate)
    else:
        ref_losses, ref_norms = train_fsdp2(kind, ref_model, opt, accumulate, precision)
    state = dp.state_dict()
    ref = {k: whole(v) for k, v in ref_model.state_dict().items()}
    assert state["model"].keys() == ref.keys()
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {dtype}  # the masters
    params = max(rel(state["model"][k], ref[k]) for k in ref)
    names = {p: n for n, p in ref_model.named_parameters()}
    moments = max(
        rel(state["optimizer"][names[p]][k], whole(s[k]))
        for p, s in opt.state.items()
        for k in ("exp_avg", "exp_avg_sq")
    )
    return {
        "losses": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        # fp16: a step whose scaled gradients overflow has a non-finite norm on both sides (inf or nan, by
        # where the overflow met the unscaling), and both skip it
        "norms": max(
            0.0 if not (math.isfinite(a) or math.isfinite(b)) else abs(a - b) / b
            for a, b in zip(norms, ref_norms, strict=True)
        ),
        "skipped": sum(not math.isfinite(n) for n in ref_norms),
        "params": params,
        "moments": moments,
        "unmoved": [
            k
            for k, v in state["model"].items()
            if v.is_floating_point() and torch.equal(v, start[k]) and "inv_freq" not in k
        ],
        "clipped": min(n for n in ref_norms if math.isfinite(n)) > MAX_NORM,
        "computes_in": {p.dtype for p in model.parameters()},  # the parameters the forward reads
    }


def check(results: list[dict], bound: dict) -> None:
    for r in results:
        for what in ("losses", "norms", "params", "moments"):
            assert r[what] <= bound["rtol"], (what, r)
        assert r["unmoved"] == [], r  # every parameter was trained
        assert r["clipped"], r


def case(kind, mode, world, accumulate, slow):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(
        kind, mode, world, accumulate, marks=marks, id=f"{kind}-{mode}-dp{world}-acc{accumulate}"
    )


# The default run: every mode once at dp 2 with accumulation, both models in ZeRO-3, two cases at dp 4.
DEFAULT = {
    ("llama", "ddp", 2, 2),
    ("encoder", "zero1", 2, 2),
    ("llama", "zero2", 2, 2),
    ("llama", "zero3", 2, 2),
    ("encoder", "zero3", 2, 2),
    ("encoder", "zero1-offload", 2, 2),
    ("llama", "zero2-offload", 2, 2),
    ("encoder", "zero3-offload", 2, 2),
    ("llama", "zero3-offload-all", 2, 2),
    ("llama", "zero3", 4, 2),
    ("encoder", "zero2", 4, 1),
    ("llama", "zero3-hybrid", 4, 2),
}
CASES = [
    case(kind, mode, world, accumulate, (kind, mode, world, accumulate) not in DEFAULT)
    for kind in ("llama", "encoder")
    for mode in MODES
    for world in (2, 4)
    for accumulate in (1, 2)
]


@pytest.mark.parametrize("kind, mode, world, accumulate", CASES)
def test_matches_torch_ddp_float64(request, kind, mode, world, accumulate):
    world_fixture = request.getfixturevalue(f"world{world}")
    check(world_fixture.run(train_case, kind, mode, accumulate), FP64)


@pytest.mark.parametrize(
    "kind, mode",
    [
        ("encoder", "zero3"),
        pytest.param("llama", "ddp", marks=pytest.mark.slow),
        pytest.param("llama", "zero2-offload", marks=pytest.mark.slow),
    ],
)
def test_matches_torch_ddp_float32(world2, kind, mode):
    check(world2.run(train_case, kind, mode, 2, "float32"), FP32)


@pytest.mark.parametrize(
    "kind, mode, precision",
    [
        ("llama", "zero3", "bf16"),
        ("encoder", "zero2", "fp16"),
        pytest.param("llama", "zero1", "fp16", marks=pytest.mark.slow),
        pytest.param("encoder", "ddp", "bf16", marks=pytest.mark.slow),
        pytest.param("encoder", "zero3-offload-all", "fp16", marks=pytest.mark.slow),
    ],
)
def test_mixed_precision_matches_torch_fsdp2(world2, kind, mode, precision):
    results = world2.run(train_case, kind, mode, 2, "float32", precision)
    check(results, LOW_PRECISION[precision])
    assert all(r["computes_in"] == {DTYPES[precision]} for r in results), results


# --- memory -------------------------------------------------------------------------------------------

# Bytes per parameter for fp32 AdamW over N ranks, (parameters, gradients, optimizer state) on the device
# and on the host; offloaded optimizer state is the moments and an fp32 master copy of the shard.
FORMULA = {
    "ddp": lambda n: {"device": (4, 4, 8), "host": (0, 0, 0)},
    "zero1": lambda n: {"device": (4, 4, 8 / n), "host": (0, 0, 0)},
    "zero2": lambda n: {"device": (4, 4 / n, 8 / n), "host": (0, 0, 0)},
    "zero3": lambda n: {"device": (4 / n, 4 / n, 8 / n), "host": (0, 0, 0)},
    "zero2-offload": lambda n: {"device": (4, 4 / n, 0), "host": (0, 0, 12 / n)},
    "zero3-offload-all": lambda n: {"device": (0, 4 / n, 0), "host": (4 / n, 0, 12 / n)},
}
# In all, at N = 2: the 16/12/10/8 pattern; offload moves the optimizer state to the host and adds the
# 4/N master copy there.
PER_PARAM_AT_2 = {"ddp": 16, "zero1": 12, "zero2": 10, "zero3": 8}
PER_PARAM_AT_2.update({"zero2-offload": 12, "zero3-offload-all": 10})


def held_case(kind: str, mode: str, precision: str = "fp32") -> dict:
    model = build(kind, torch.float32)
    count = sum(p.numel() for p in model.parameters())
    dp = wrap(model, **options(kind, mode, model), bucket_mb=0.01, precision=precision)
    train_ours(kind, dp, 1, range(1))
    buckets = len(dp.sync.buckets.buckets) if mode == "ddp" else len(dp.sync.buckets)
    return {"held": dp.held_bytes(), "count": count, "buckets": buckets}


# bf16: 2-byte parameters, fp32 gradients, and the 4-byte fp32 master beside the 8 of moments.
FORMULA_BF16 = {
    "ddp": lambda n: {"device": (2, 4, 12), "host": (0, 0, 0)},
    "zero1": lambda n: {"device": (2, 4, 12 / n), "host": (0, 0, 0)},
    "zero3": lambda n: {"device": (2 / n, 4 / n, 12 / n), "host": (0, 0, 0)},
    "zero3-offload-all": lambda n: {"device": (0, 4 / n, 0), "host": (2 / n, 0, 12 / n)},
}


@pytest.mark.parametrize("kind", ["llama", "encoder"])
@pytest.mark.parametrize("mode", list(FORMULA))
def test_held_bytes_follow_the_zero_formula(world2, kind, mode):
    results = world2.run(held_case, kind, mode)
    check_held(results, FORMULA[mode])
    for r in results:
        total = sum(sum(r["held"][where].values()) for where in ("device", "host")) / r["count"]
        assert round(total) == PER_PARAM_AT_2[mode], r


@pytest.mark.parametrize("mode", list(FORMULA_BF16))
def test_held_bytes_in_bf16_follow_the_zero_formula(world2, mode):
    check_held(world2.run(held_case, "llama", mode, "bf16"), FORMULA_BF16[mode])


def check_held(results: list[dict], formula) -> None:
    n = 2
    for r in results:
        for where, per_param in formula(n).items():
            for what, bytes_per_param in zip(("params", "grads", "optimizer"), per_param, strict=True):
                exact = bytes_per_param * r["count"]
                # Each bucket is padded to a multiple of n elements: at most n - 1 more, at these bytes each.
                padding = r["buckets"] * (n - 1) * bytes_per_param
                assert exact <= r["held"][where][what] <= exact + padding, (where, what, r)


# --- checkpoints --------------------------------------------------------------------------------------


def save_case(path: str) -> dict:
    """ZeRO-3 at dp 2, two steps; rank 0 writes the canonical state."""
    model = build("llama")
    dp = wrap(model, **options("llama", "zero3", model), **ADAMW, max_grad_norm=MAX_NORM)
    train_ours("llama", dp, 2, range(2))
    state = dp.state_dict()
    if dist.get_rank() == 0:
        torch.save(state, path)
    with torch.no_grad():
        tokens = torch.arange(SEQ).remainder(VOCAB)[None]
        out = dp(input_ids=tokens, use_cache=False).logits
    return {"logits": out}


def resume_case(path: str, mode: str) -> dict:
    """Load at dp 4 in `mode` and train two more steps; torch DDP resumes from the same file."""
    state = torch.load(path)
    model = build("llama")
    dp = wrap(model, **options("llama", mode, model), **ADAMW, max_grad_norm=MAX_NORM)
    dp.load_state_dict(state)
    again = dp.state_dict()
    round_trip = all(torch.equal(again["model"][k], v) for k, v in state["model"].items()) and all(
        torch.equal(again["optimizer"][n][k], v) for n, s in state["optimizer"].items() for k, v in s.items()
    )
    losses, norms = train_ours("llama", dp, 2, range(2, 4))
    ref_model = build("llama")
    ref_model.load_state_dict(state["model"])
    opt = torch_adamw(ref_model)
    for name, p in ref_model.named_parameters():
        opt.state[p] = {k: v.clone() for k, v in state["optimizer"][name].items()}
    ref_losses, ref_norms = train_torch("llama", ref_model, opt, 2, steps=range(2, 4))
    ours = dp.state_dict()["model"]
    return {
        "round_trip": round_trip,
        "losses": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        "norms": max(abs(a - b) / b for a, b in zip(norms, ref_norms, strict=True)),
        "params": max(rel(ours[k], v) for k, v in ref_model.state_dict().items()),
    }


@pytest.mark.parametrize("mode", ["zero3", pytest.param("zero1-offload", marks=pytest.mark.slow)])
def test_zero3_checkpoint_from_dp2_resumes_at_dp4_and_loads_into_the_plain_model(
    world2, world4, tmp_path, mode
):
    path = str(tmp_path / "state.pt")
    saved = world2.run(save_case, path)
    for r in world4.run(resume_case, path, mode):
        assert r["round_trip"], r
        for what in ("losses", "norms", "params"):
            assert r[what] <= FP64["rtol"], (what, r)
    # The plain model, one process, no wrapper: the same function as the wrapped one.
    state = torch.load(path)
    model = build("llama")
    model.load_state_dict(state["model"])
    with torch.no_grad():
        tokens = torch.arange(SEQ).remainder(VOCAB)[None]
        assert torch.equal(model(input_ids=tokens, use_cache=False).logits, saved[0]["logits"])


def bf16_resume_case(mode: str) -> dict:
    """bf16: two steps, the state saved, then a third step by the same wrapper and by a fresh one that
    loaded the state. The checkpoint holds the fp32 masters, so the resumed wrapper continues exactly."""
    model = build("llama", torch.float32)
    dp = wrap(model, **options("llama", mode, model), **ADAMW, max_grad_norm=MAX_NORM, precision="bf16")
    train_ours("llama", dp, 2, range(2))
    state = dp.state_dict()
    fresh = build("llama", torch.float32)
    again = wrap(fresh, **options("llama", mode, fresh), **ADAMW, max_grad_norm=MAX_NORM, precision="bf16")
    again.load_state_dict(state)
    round_trip = again.state_dict()
    same = all(torch.equal(round_trip["model"][k], v) for k, v in state["model"].items())
    ours, resumed = train_ours("llama", dp, 2, range(2, 3)), train_ours("llama", again, 2, range(2, 3))
    after, resumed_after = dp.state_dict()["model"], again.state_dict()["model"]
    return {
        "masters": {v.dtype for v in state["model"].values() if v.is_floating_point()},
        "round_trip": same,
        "continues": ours == resumed and all(torch.equal(after[k], v) for k, v in resumed_after.items()),
    }


@pytest.mark.parametrize("mode", ["zero3", pytest.param("ddp", marks=pytest.mark.slow)])
def test_bf16_state_holds_the_fp32_masters_and_resumes_exactly(world2, mode):
    for r in world2.run(bf16_resume_case, mode):
        assert r == {"masters": {torch.float32}, "round_trip": True, "continues": True}, r

"""Mixture-of-experts: routing against a direct loop reference, dispatch/combine over real all-to-alls,
and whole-model training under expert, tensor, sequence and pipeline parallelism equal to torch DDP on
the same model with every expert local (float64 to 1e-10, fp32 losses and grad norms to 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dtrain.config import load_config
from dtrain.model import Transformer, count_params
from parallel.expert_parallel import run_experts
from parallel.moe import MoELayer, expert_capacity, route
from tests import harness
from tests.reference import layout_matches_ddp
from tests.tolerances import FP64

MOE = ("model.moe.num_experts=4", "model.moe.capacity_factor=1.0")


def loop_route(logits: torch.Tensor, k: int, capacity: int) -> dict:
    """Routing written out token by token: first choices before second, each in sequence order."""
    tokens, experts = logits.shape
    probs = torch.softmax(logits, -1)
    choice = [sorted(range(experts), key=lambda e: -float(probs[t, e]))[:k] for t in range(tokens)]
    filled = [0] * experts
    keep = torch.zeros(tokens, k, dtype=torch.bool)
    routed = [0] * experts
    for j in range(k):
        for t in range(tokens):
            e = choice[t][j]
            routed[e] += 1
            keep[t, j] = filled[e] < capacity
            filled[e] += 1
    weight = torch.stack([probs[t, choice[t]] / probs[t, choice[t]].sum() for t in range(tokens)])
    share = torch.tensor(routed, dtype=logits.dtype) / (tokens * k)
    aux = experts * sum(share[e] * probs[:, e].mean() for e in range(experts))
    z = torch.stack([torch.logsumexp(logits[t], 0) ** 2 for t in range(tokens)]).mean()
    return {"expert": torch.tensor(choice), "keep": keep, "weight": weight, "aux": aux, "z": z}


@pytest.mark.parametrize("k", [1, 2])
def test_routing_matches_a_token_by_token_reference(k):
    logits = torch.randn(24, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    capacity = expert_capacity(0.75, 24, k, 4)
    assert capacity == math.floor(0.75 * 24 * k / 4)
    r, ref = route(logits, k, capacity, total_tokens=24), loop_route(logits, k, capacity)
    assert torch.equal(r.expert, ref["expert"])
    assert torch.equal(r.keep, ref["keep"]) and not r.keep.all()  # this capacity drops slots
    torch.testing.assert_close(r.weight, ref["weight"], **FP64)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(24, dtype=torch.float64), **FP64)
    torch.testing.assert_close(r.aux_loss, ref["aux"], **FP64)
    torch.testing.assert_close(r.z_loss, ref["z"], **FP64)
    assert int(r.counts.sum()) == 24 * k


def test_moe_layer_output_and_aux_gradient():
    """The layer computes sum over kept choices of w * SwiGLU_e(x) (zero for a token whose choices were
    all dropped), and its backward adds d(scale * (a * aux + z_coef * z)) to the router gradient."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, 0.5, aux_loss_coef=0.3, z_loss_coef=0.2).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer.aux_grad_scale = 0.7
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    out = layer(x)
    tokens = x.transpose(0, 1).reshape(12, 8)  # the layer's sequence-major token order
    logits = tokens @ layer.router.weight.T
    r = route(logits, 2, expert_capacity(0.5, 12, 2, 4), 12)
    ex = layer.experts
    expected = torch.zeros_like(tokens)
    for t in range(12):
        for j in range(2):
            if r.keep[t, j]:
                e = int(r.expert[t, j])
                h = torch.nn.functional.silu(ex.w1[e] @ tokens[t]) * (ex.w3[e] @ tokens[t])
                expected[t] += r.weight[t, j] * (ex.w2[e] @ h)
    expected = expected.view(6, 2, 8).transpose(0, 1)
    torch.testing.assert_close(out, expected, **FP64)
    assert (~r.keep).all(-1).any(), "the capacity should drop every choice of some token"
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ours = layer.router.weight.grad.clone()
    layer.zero_grad()
    objective = (expected * g).sum() + 0.7 * (0.3 * r.aux_loss + 0.2 * r.z_loss)
    objective.backward()
    torch.testing.assert_close(ours, layer.router.weight.grad, **FP64)


def test_count_params_counts_experts_and_routers():
    cfg = load_config(None, ["model.moe.num_experts=4", "model.moe.every_n_layers=2", "model.n_layers=4"])
    model = Transformer(cfg.model)
    counts = count_params(cfg.model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.model.d_model * model.blocks["1"].mlp.experts.w1.shape[1]
    assert counts["blocks"] - counts["blocks_active"] == 2 * (4 - cfg.model.moe.top_k) * per_expert
    assert [type(model.blocks[str(i)].mlp).__name__ for i in range(4)] == ["SwiGLU", "MoELayer"] * 2


def dispatch_case(ep: int) -> dict:
    """Rows with random experts (rank 3 sends nothing, expert 5 gets nothing) through the all-to-alls:
    identity experts give the rows back exactly, scaling experts (row * (e + 1)) prove each row met
    its own expert, and the backward returns (e + 1) * the output gradient."""
    grid = harness.grid(dp=dist.get_world_size(), ep=ep)
    rank, experts = dist.get_rank(), 8
    gen = torch.Generator().manual_seed(rank)
    n = 0 if rank == 3 else 5 + 3 * rank
    choices = torch.tensor([e for e in range(experts) if e != 5])
    expert = choices[torch.randint(len(choices), (n,), generator=gen)]
    rows = torch.randn(n, 6, dtype=torch.float64, generator=gen).requires_grad_()
    group = grid.ep_group if ep > 1 else None
    first = grid.rank_in("ep") * experts // ep

    def identity(x, counts):
        return x

    def scale(x, counts):
        ids = torch.repeat_interleave(torch.arange(len(counts)) + first + 1, torch.tensor(counts))
        return x * ids.unsqueeze(-1)

    same = run_experts(rows, expert, experts, identity, group)
    scaled = run_experts(rows, expert, experts, scale, group)
    g = torch.randn_like(scaled)
    scaled.backward(g)
    factor = (expert + 1).unsqueeze(-1).to(rows.dtype)
    return {
        "identity": torch.equal(same, rows),
        "scaled": torch.equal(scaled, rows * factor),
        "grad": torch.equal(rows.grad, g * factor),
    }


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_dispatch_then_combine_returns_every_row(world4, ep):
    for result in world4.run(dispatch_case, ep):
        assert result == {"identity": True, "scaled": True, "grad": True}


def tp_routing_case() -> dict:
    """Tokens split over the tensor group route exactly as the whole micro-batch does."""
    tp_group = harness.grid(tp=2).tp_group
    rank = dist.get_rank()
    logits = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    whole = route(logits, 2, 6, 20)
    part = route(logits[rank * 10 : (rank + 1) * 10], 2, 6, 20, tp_group)
    shares = torch.stack([part.aux_loss, part.z_loss])
    dist.all_reduce(shares, group=tp_group)
    return {
        "keep": torch.equal(part.keep, whole.keep[rank * 10 : (rank + 1) * 10]),
        "aux_z": torch.allclose(shares, torch.stack([whole.aux_loss, whole.z_loss]), rtol=1e-12, atol=0),
        "drops": not whole.keep.all(),
    }


def test_routing_split_over_tensor_ranks_matches_the_whole(world2):
    for result in world2.run(tp_routing_case):
        assert result == {"keep": True, "aux_z": True, "drops": True}


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


# Tensor-parallel MoE also runs in the default slice of tests/test_matrix.py; these stay in the slow set.
SLOW_MOE = {"tp2-top1-ckpt", "ep2-tp2-sp-top2"}


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
    from dtrain.config import ConfigError, validate

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
        pytest.param(v, id=k, marks=[] if k.startswith("zero3") else [pytest.mark.slow])
        for k, v in ZERO_CASES.items()
    ],
)
def test_moe_with_zero_matches_torch_ddp(world4, layout):
    """ZeRO shards dense state over dp and expert state over the expert-data-parallel group."""
    world4.run(moe_training_case, layout, (*TOP2, "train.grad_clip=0.05"))


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

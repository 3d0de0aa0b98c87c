"""Every combination composes: the same tiny model, dense and mixture-of-experts, trained under every
layout the grid can factor in 2, 4 and 8 ranks (tp x pp x dp, ep carved out of dp, sequence parallelism
on and off, ZeRO stage 0-3), plus context parallelism (cp=2 and 4) with each other axis and hybrid
sharding over parallel.dp_shard of 4 data-parallel ranks, and compared with torch DDP on the unsharded
model: every loss, grad norm and parameter in float64 to 1e-10, losses and grad norms in fp32 to 1e-5
(tests/reference.py, layout_matches_ddp). Each case also holds `dtrain estimate`'s per-rank model-state
bytes (from the config alone) to what every rank's trainer measures
(`Trainer.held_bytes()`): they must be equal. Every case also trains a step in bf16 (16-bit parameters,
fp32 gradients and masters), where held bytes must equal the estimate too.

Offload, activation checkpointing, the pipeline schedule and tied embeddings rotate over the cases (each
appears many times, in many layouts) rather than multiplying them. The full matrix is marked slow
(`pytest -m slow tests/equivalence/test_matrix.py`); the default run trains a representative slice on 2
and 4 ranks, one case per kind of composition.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.reference import TINY, assert_held_bytes_are_estimated, dtrain_run, layout_matches_ddp, tiny_config

MODEL = (
    "model.n_layers=4",
    "train.global_batch_size=16",
    "train.micro_batch_size=2",
    "train.steps=3",
)
MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.0")


def _layouts(world: int):
    """(tp, pp, dp) with tp dividing the 4 heads and pp at most 4 of the 4 blocks."""
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            if world % (tp * pp) == 0:
                yield tp, pp, world // (tp * pp)


def _case(index: int, world: int, tp: int, pp: int, dp: int, sp: bool, zero: int, moe: bool):
    ep = max(e for e in (1, 2, 4) if dp % e == 0) if moe else 1
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero={zero}", f"parallel.ep={ep}"]
    if sp:
        layout.append("parallel.sp=true")
    offloads = {
        0: ["none"],
        1: ["none", "optimizer"],
        2: ["none", "optimizer"],
        3: ["none", "optimizer", "all"],
    }
    offload = offloads[zero][index % len(offloads[zero])]
    layout.append(f"parallel.offload={offload}")
    if pp == 2:
        schedule = ("1f1b", "gpipe", "interleaved")[index % 3]
        layout.append(f"parallel.pp_schedule={schedule}")
        if schedule == "interleaved":
            layout.append("parallel.pp_virtual_stages=2")
    overrides = list(MODEL) + (list(MOE) if moe else [])
    if index % 3 == 1:
        overrides.append("train.activation_checkpointing=true")
    if index % 2:
        overrides.append("model.tie_embeddings=true")
    name = f"w{world}-tp{tp}{'sp' if sp else ''}-pp{pp}-dp{dp}-zero{zero}-" + (
        f"moe-ep{ep}" if moe else "dense"
    )
    return name, (world, tuple(layout), tuple(overrides))


def matrix() -> dict:
    cases, index = {}, 0
    for world in (2, 4, 8):
        for tp, pp, dp in _layouts(world):
            for sp in (False, True) if tp > 1 else (False,):
                for zero in (0, 1, 2, 3):
                    for moe in (False, True):
                        name, case = _case(index, world, tp, pp, dp, sp, zero, moe)
                        cases[name] = case
                        index += 1
    return cases


def hybrid_cases() -> dict:
    """Hybrid sharding on 4 data-parallel ranks: shard groups of k in {1, 2, 4} for ZeRO 1-3 (one with
    offload), and experts (ep 2, ZeRO 1-3) sharded within a shard group of 2 and replicated across."""
    cases = {}
    for zero in (1, 2, 3):
        for k in (1, 2, 4):
            offload = "optimizer" if (zero, k) == (2, 2) else "none"
            layout = (
                "parallel.dp=4",
                f"parallel.zero={zero}",
                f"parallel.dp_shard={k}",
                f"parallel.offload={offload}",
            )
            tie = ("model.tie_embeddings=true",) if zero == 3 else ()
            cases[f"w4-dp4-zero{zero}-shard{k}-dense"] = (4, layout, (*MODEL, *tie))
    for zero in (1, 2, 3):
        layout = ("parallel.dp=4", "parallel.ep=2", f"parallel.zero={zero}", "parallel.dp_shard=2")
        cases[f"w4-dp4-zero{zero}-shard2-moe-ep2"] = (4, layout, (*MODEL, *MOE))
    return cases


def _cp(*layout: str, overrides: tuple[str, ...] = (), cp: int = 2) -> tuple:
    world = cp
    for part in layout:
        if part.split("=")[0] in ("parallel.tp", "parallel.pp", "parallel.dp"):
            world *= int(part.split("=")[1])
    return world, (f"parallel.cp={cp}", *layout), (*MODEL, *overrides)


# Context parallelism with each other axis (the load-balanced chunks of 16 tokens are 4 long; 2 at cp=4).
CONTEXT_PARALLEL = {
    "w2-cp2-dp1-zero0-dense": _cp("parallel.dp=1", overrides=("model.tie_embeddings=true",)),
    "w4-cp2-dp2-zero1-dense": _cp("parallel.dp=2", "parallel.zero=1", "parallel.offload=optimizer"),
    "w4-cp2-tp2-dp1-zero0-dense": _cp("parallel.tp=2", "parallel.dp=1"),
    "w4-cp2-tp2sp-dp1-zero2-dense": _cp(
        "parallel.tp=2",
        "parallel.sp=true",
        "parallel.dp=1",
        "parallel.zero=2",
        overrides=("train.activation_checkpointing=true",),
    ),
    "w4-cp2-pp2-dp1-zero0-dense": _cp("parallel.pp=2", "parallel.dp=1", "parallel.pp_schedule=1f1b"),
    "w4-cp2-pp2-dp1-zero1-interleaved-dense": _cp(
        "parallel.pp=2",
        "parallel.dp=1",
        "parallel.zero=1",
        "parallel.pp_schedule=interleaved",
        "parallel.pp_virtual_stages=2",
        overrides=("model.tie_embeddings=true",),
    ),
    "w4-cp2-pp2-dp1-zero0-gpipe-dense": _cp(
        "parallel.pp=2",
        "parallel.dp=1",
        "parallel.pp_schedule=gpipe",
        overrides=("train.activation_checkpointing=true",),
    ),
    "w2-cp2-dp1-zero1-moe-ep1": _cp("parallel.dp=1", "parallel.zero=1", overrides=MOE),
    "w4-cp2-dp2-zero0-moe-ep2": _cp("parallel.dp=2", "parallel.ep=2", overrides=MOE),
    "w4-cp2-dp2-zero2-moe-ep2": _cp(
        "parallel.dp=2",
        "parallel.ep=2",
        "parallel.zero=2",
        overrides=(*MOE, "train.activation_checkpointing=true"),
    ),
    "w4-cp2-tp2-dp1-zero0-moe-ep1": _cp("parallel.tp=2", "parallel.dp=1", overrides=MOE),
    "w4-cp2-tp2sp-dp1-zero3-moe-ep1": _cp(
        "parallel.tp=2", "parallel.sp=true", "parallel.dp=1", "parallel.zero=3", overrides=MOE
    ),
    "w4-cp2-pp2-dp1-zero1-moe-ep1": _cp("parallel.pp=2", "parallel.dp=1", "parallel.zero=1", overrides=MOE),
    "w4-cp4-dp1-zero1-dense": _cp("parallel.dp=1", "parallel.zero=1", cp=4),
    "w4-cp4-dp1-zero0-moe-ep1": _cp("parallel.dp=1", overrides=MOE, cp=4),
    "w2-cp2-dp1-zero3-dense": _cp("parallel.dp=1", "parallel.zero=3", "parallel.offload=all"),
    # with hybrid sharding: a shard group holds whole cp groups; expert copies span edp x cp
    "w4-cp2-dp2-zero2-shard2-dense": _cp("parallel.dp=2", "parallel.zero=2", "parallel.dp_shard=2"),
    "w4-cp2-dp2-zero1-shard2-moe-ep1": _cp(
        "parallel.dp=2", "parallel.zero=1", "parallel.dp_shard=2", overrides=MOE
    ),
    "w8-cp2-dp4-zero3-shard4-moe-ep2": _cp(
        "parallel.dp=4", "parallel.ep=2", "parallel.zero=3", "parallel.dp_shard=4", overrides=MOE
    ),
    "w4-cp2-dp2-zero3-dense": _cp(
        "parallel.dp=2", "parallel.zero=3", overrides=("train.activation_checkpointing=true",)
    ),
}

MATRIX = matrix() | hybrid_cases() | CONTEXT_PARALLEL
# One case per kind of composition on 2 and 4 ranks (the rest, 8 ranks included, run with -m slow).
DEFAULT = (
    "w2-cp2-dp1-zero0-dense",
    "w2-tp2sp-pp1-dp1-zero2-moe-ep1",
    "w4-tp1-pp2-dp2-zero3-moe-ep2",
    "w4-tp2-pp2-dp1-zero1-dense",
    "w4-tp2sp-pp1-dp2-zero3-dense",
    "w4-dp4-zero3-shard2-dense",
)


def matrix_case(layout: tuple[str, ...], overrides: tuple[str, ...]) -> dict:
    result = layout_matches_ddp(layout, overrides)
    return {k: result[k] for k in ("losses", "held_bytes", "pp_rank")}


def _run(request, name: str) -> None:
    world, layout, overrides = MATRIX[name]
    results = request.getfixturevalue(f"world{world}").run(matrix_case, layout, overrides)
    losses = results[0]["losses"]
    assert losses[-1] < losses[0]
    assert_held_bytes_are_estimated(results, [*TINY, *layout, *overrides], world)


@pytest.mark.parametrize("name", DEFAULT)
def test_layout_matches_torch_ddp(request, name):
    _run(request, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MATRIX if n not in DEFAULT])
def test_full_matrix_matches_torch_ddp(request, name):
    _run(request, name)


BF16 = ("train.precision=bf16", "train.steps=1")


def bf16_held_bytes(layout: tuple[str, ...], overrides: tuple[str, ...]) -> dict:
    from tests import harness

    cfg = tiny_config(dist.get_world_size(), *layout, *overrides, *BF16)
    p = cfg.parallel
    grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, dp_shard=p.dp_shard)
    run = dtrain_run(cfg, grid)  # after a step: gradient buffers and optimizer states exist
    return {"held_bytes": run["trainer"].held_bytes(), "pp_rank": grid.coords.pp}


def _run_bf16(request, name: str) -> None:
    world, layout, overrides = MATRIX[name]
    results = request.getfixturevalue(f"world{world}").run(bf16_held_bytes, layout, overrides)
    assert_held_bytes_are_estimated(results, [*TINY, *layout, *overrides, *BF16], world)


# bf16 by default: one dense and one expert case on 4 ranks, with tp, sp, pp and ZeRO-3 between them.
BF16_DEFAULT = ("w4-tp2sp-pp1-dp2-zero3-dense", "w4-tp1-pp2-dp2-zero3-moe-ep2")


@pytest.mark.parametrize("name", BF16_DEFAULT)
def test_layout_holds_its_estimate_in_bf16(request, name):
    _run_bf16(request, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MATRIX if n not in BF16_DEFAULT])
def test_full_matrix_holds_its_estimate_in_bf16(request, name):
    _run_bf16(request, name)


def test_matrix_covers_every_axis():
    """The generated matrix holds every axis value the design names, so a change to the generator cannot
    silently drop a combination."""
    joined = " ".join(" ".join(layout + overrides) for _, layout, overrides in MATRIX.values())
    for fragment in (
        *(f"parallel.zero={z}" for z in range(4)),
        *(f"parallel.ep={e}" for e in (1, 2, 4)),
        *(f"parallel.tp={t}" for t in (1, 2, 4)),
        *(f"parallel.pp={p}" for p in (1, 2, 4)),
        "parallel.sp=true",
        "parallel.offload=optimizer",
        "parallel.offload=all",
        "parallel.pp_schedule=interleaved",
        "parallel.pp_schedule=gpipe",
        "train.activation_checkpointing=true",
        "model.tie_embeddings=true",
        "model.moe.num_experts=4",
        *(f"parallel.dp_shard={k}" for k in (1, 2, 4)),
        "parallel.cp=2",
    ):
        assert fragment in joined, fragment
    assert set(DEFAULT) <= set(MATRIX)

"""Pipeline parallelism in the trainer (the schedules as data: tests/unit/test_pipeline_schedules.py):
chunk splitting, config errors, and training under GPipe, 1F1B and interleaved 1F1B equal to torch DDP
on the unsharded model."""

from __future__ import annotations

import itertools

import pytest
import torch

from dtrain.config import ConfigError, load_config
from dtrain.stage import balanced_split
from dtrain.trainer import Trainer
from dtrain.validation import validate
from tests import harness
from tests.reference import TINY, layout_matches_ddp, tiny_config

# --- schedules as data -------------------------------------------------------------------------------


def test_balanced_split():
    assert balanced_split(4, 2) == [range(0, 2), range(2, 4)]
    assert [len(r) for r in balanced_split(7, 3)] == [2, 2, 3]
    with pytest.raises(ValueError, match="cannot be split into 4 pipeline chunks"):
        balanced_split(3, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.pp=4", "model.n_layers=4", "train.global_batch_size=12"],
         "1f1b needs at least parallel.pp=4 micro-batches per rank, got 3"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2"],
         "model.n_layers=2 cannot be split into 4 pipeline chunks"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved", "model.n_layers=4"],
         "needs parallel.pp_virtual_stages >= 2"),
        (["parallel.pp=2", "parallel.pp_virtual_stages=2", "model.n_layers=4"],
         "pp_virtual_stages=2 needs parallel.pp_schedule=interleaved"),
    ],
)  # fmt: skip
def test_pipeline_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [*TINY, *overrides]), 4)


# --- training equal to torch DDP ---------------------------------------------------------------------


def assert_stages_cover_the_model(results: list[dict]) -> None:
    """Together the ranks compared every parameter of the reference (each stage its own part)."""
    held = set().union(*(r["held"] for r in results))
    assert held == set(results[0]["all"])


def _layout(pp: int, schedule: str, m: int, dp: int, v: int = 1) -> tuple[str, ...]:
    return (
        f"parallel.pp={pp}",
        f"parallel.pp_schedule={schedule}",
        f"parallel.pp_virtual_stages={v}",
        f"train.global_batch_size={4 * m * dp}",  # 4 = the tiny config's micro-batch size
    )


CASES_2 = {
    f"pp2-{s}-m{m}-{'tied' if tie else 'untied'}": (_layout(2, s, m, 1, 2 if s == "interleaved" else 1), tie)
    for s, m, tie in itertools.product(("gpipe", "1f1b", "interleaved"), (2, 4), (False, True))
}


@pytest.mark.parametrize(("layout", "tie"), CASES_2.values(), ids=CASES_2.keys())
def test_pipeline_matches_torch_ddp_2_ranks(world2, layout, tie):
    overrides = ("model.n_layers=4", f"model.tie_embeddings={str(tie).lower()}")
    results = world2.run(layout_matches_ddp, layout, overrides)
    assert results[0]["losses"][-1] < results[0]["losses"][0]
    assert_stages_cover_the_model(results)


CASES_4 = {
    "pp4-1f1b-m4-tied": (_layout(4, "1f1b", 4, 1), True),
    "pp4-gpipe-m8": (_layout(4, "gpipe", 8, 1), False),
    "pp4-interleaved-m4-tied": (_layout(4, "interleaved", 4, 1, 2), True),
    "pp2-dp2-1f1b-m2-tied": (_layout(2, "1f1b", 2, 2), True),
    "pp2-dp2-interleaved-m4": (_layout(2, "interleaved", 4, 2, 2), False),
    "pp2-dp2-gpipe-m4-ckpt": ((*_layout(2, "gpipe", 4, 2), "train.activation_checkpointing=true"), True),
    "pp2-tp2-sp-1f1b-m2-tied": ((*_layout(2, "1f1b", 2, 1), "parallel.tp=2", "parallel.sp=true"), True),
}


@pytest.mark.parametrize(("layout", "tie"), CASES_4.values(), ids=CASES_4.keys())
def test_pipeline_matches_torch_ddp_4_ranks(world4, layout, tie):
    overrides = ("model.n_layers=8", f"model.tie_embeddings={str(tie).lower()}")
    assert_stages_cover_the_model(world4.run(layout_matches_ddp, layout, overrides))


def _full_matrix() -> dict:
    """Every combination of pp {2, 4} x schedule x m {pp, 2pp} x dp {1, 2} x tied/untied,
    less those the default run covers above."""
    cases = {}
    for pp, schedule, m_factor, dp, tie in itertools.product(
        (2, 4), ("gpipe", "1f1b", "interleaved"), (1, 2), (1, 2), (False, True)
    ):
        m = pp * m_factor
        name = f"pp{pp}-dp{dp}-{schedule}-m{m}-{'tied' if tie else 'untied'}"
        cases[name] = (pp * dp, _layout(pp, schedule, m, dp, 2 if schedule == "interleaved" else 1), tie)
    return {k: v for k, v in cases.items() if v[0] > 2}  # world 2 (pp2 x dp1) is fully covered by default


@pytest.mark.slow
@pytest.mark.parametrize(("world", "layout", "tie"), _full_matrix().values(), ids=_full_matrix().keys())
def test_pipeline_full_matrix(request, world, layout, tie):
    overrides = ("model.n_layers=8", f"model.tie_embeddings={str(tie).lower()}")
    w = request.getfixturevalue(f"world{world}")
    assert_stages_cover_the_model(w.run(layout_matches_ddp, layout, overrides))


def pp2_trainer(n_layers: int, m: int, *overrides: str) -> Trainer:
    """A 1F1B trainer over pp 2 (the world's two ranks) with m micro-batches."""
    cfg = tiny_config(2, f"model.n_layers={n_layers}", *_layout(2, "1f1b", m, 1), *overrides)
    return Trainer(cfg, harness.grid(pp=2, dp=1), torch.device("cpu"))


def recompute_case() -> list[int]:
    """Block forwards in one pipelined step under activation checkpointing."""
    trainer = pp2_trainer(4, 4, "train.activation_checkpointing=true")
    calls = []
    for chunk in trainer.model.chunks.values():
        for block in chunk.blocks.values():
            block.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
    trainer.train_step()
    return [len(calls)]


def test_checkpointed_blocks_recompute_once_per_micro_batch(world2):
    """The forward, then one recomputation in the backward: the last backward of a stage, split into an
    input and a weight pass elsewhere, runs whole here, since a checkpointed block recomputes in every
    backward call that needs its saved tensors."""
    assert world2.run(recompute_case) == [[2 * 2 * 4], [2 * 2 * 4]]  # 2 blocks a stage, 4 micro-batches


def split_flags_case() -> list[bool]:
    """Whether the executor splits the last backward, by config."""
    extras = ((), ("parallel.pp_split_backward=false",), ("train.activation_checkpointing=true",))
    return [pp2_trainer(2, 2, *extra).model.executor.input_grad_first for extra in extras]


def test_the_split_last_backward_is_on_by_default_and_off_by_config(world2):
    """parallel.pp_split_backward turns it off; so does activation checkpointing (and ZeRO-3:
    tests/equivalence/test_zero.py)."""
    assert world2.run(split_flags_case) == [[True, False, False]] * 2

"""train.compile: every block's forward compiled by torch.compile (inductor) trains as the eager blocks do.

Inductor fuses elementwise chains and reorders float operations, so a compiled run is not bitwise the
eager one; both are trained in float64 and compared to FP64 (tests/tolerances.py), every loss, grad norm
and parameter (measured: losses 2e-16, parameters 4e-15 relative after 6 steps, at dp 2, ZeRO-1 and -3
and pp 2). The eager run is the one the other equivalence tests hold to torch DDP.

Compiling costs more than the tiny training: from a cold cache about 25 s in one process on two cores
(16 s of it inductor's first use: imports and the C++ prelude), 55 s for two ranks compiling at once;
then graphs are cached, in the process and on disk. Inductor compiles in one thread here
(`compile_threads=1`): its default pool of compile processes only adds start-up cost on two cores. The
default run keeps the cheapest case, one process training the whole model with activation checkpointing
(which recomputes the compiled forward inside backward), with scalar C++ kernels (`cpp.vec_isa_ok=False`:
the same captured graphs, scalar loops in place of SIMD ones, and half the cold compile time here, 14 s
against 27 s); the layouts, each a composition with data parallelism's or
ZeRO's hooks, are marked slow and compile inductor's default, vectorized kernels (they reuse one worker's
compiled graphs).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from dtrain.config import load_config
from tests import harness
from tests.reference import TINY, compare_runs, dtrain_run, float64, tiny_config
from tests.tolerances import FP64


@contextlib.contextmanager
def compiling(vectorized: bool = True):
    """float64, and inductor compiling in this process (no pool of compile workers on two cores);
    `vectorized=False` has it write scalar C++ loops instead of ATen's SIMD classes."""
    import torch._inductor.config

    with float64(), torch._inductor.config.patch({"compile_threads": 1, "cpp.vec_isa_ok": vectorized}):
        yield


AC = ("train.activation_checkpointing=true",)


def _grid(cfg):
    p = cfg.parallel
    return harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, dp_shard=p.dp_shard)


def _ledger_step(trainer) -> dict:
    from parallel.ledger import CommLedger

    with CommLedger(trainer.grid) as ledger:
        trainer.train_step()
    return ledger.metrics()


def compiled_case(layout: tuple[str, ...]) -> dict:
    world = dist.get_world_size()
    eager_cfg = tiny_config(world, *layout)
    compiled_cfg = tiny_config(world, *layout, "train.compile=true")
    grid = _grid(eager_cfg)
    with compiling():
        eager, compiled = dtrain_run(eager_cfg, grid), dtrain_run(compiled_cfg, grid)
        # One more step each, counted by the communication ledger: compiled blocks hide no collectives.
        communication = [_ledger_step(run["trainer"]) for run in (eager, compiled)]
    compare_runs(compiled, eager, FP64)
    model = compiled["trainer"].model
    blocks = [b for chunk in model.chunks.values() for b in chunk.blocks.values()]
    return {
        "compiled": all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks),
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        # Checkpoints key on these names: compiling leaves them as they are (no `_orig_mod.`).
        "names": sorted(compiled["params"]) == sorted(eager["params"]),
        "state_dict": [list(c.state_dict()) for c in model.chunks.values()]
        == [list(c.state_dict()) for c in eager["trainer"].model.chunks.values()],
        "held_bytes": compiled["trainer"].held_bytes() == eager["trainer"].held_bytes(),
        "communication": communication[0] == communication[1] and bool(communication[0]),
        "losses": compiled["losses"],
    }


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["compiled"] and r["graphs"] >= 1
        assert r["names"] and r["state_dict"] and r["held_bytes"] and r["communication"]
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def _single_process(cfg, compile: bool) -> dict:
    """The whole model with activation checkpointing in one process, AdamW on the global batch."""
    from dtrain.data import build_dataset, global_target_tokens, rank_microbatches
    from dtrain.model import Transformer, compile_blocks, init_weights
    from dtrain.trainer import build_optimizer, lr_at

    t = cfg.train
    model = Transformer(cfg.model, activation_checkpointing=True)
    init_weights(model, t.seed)
    if compile:
        compile_blocks(model)
    opt, data = build_optimizer(model, t), build_dataset(cfg, "train")
    losses, norms = [], []
    for step in range(t.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        tokens = global_target_tokens(data, step, t.global_batch_size)
        total = 0.0
        for x, y in rank_microbatches(data, step, 0, 1, t.micro_batch_size, t.global_batch_size):
            loss_sum = model(x, y)
            (loss_sum / tokens).backward()
            total += float(loss_sum.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(total / tokens)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": norms, "params": params, "model": model}


def test_compiled_model_trains_as_eager():
    """The cheapest case: one process, activation checkpointing recomputing the compiled forward."""
    cfg = tiny_config(1, "train.steps=3")
    with compiling(vectorized=False):
        eager, compiled = _single_process(cfg, compile=False), _single_process(cfg, compile=True)
    blocks = compiled["model"].blocks.values()
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks)
    assert list(compiled["model"].state_dict()) == list(eager["model"].state_dict())  # no `_orig_mod.`
    compare_runs(compiled, eager, FP64)
    assert compiled["losses"][-1] < compiled["losses"][0]


def dropout_case() -> dict:
    world = dist.get_world_size()
    plain = tiny_config(world, "parallel.dp=2", "model.dropout=0.1", "train.compile=true")
    checkpointed = tiny_config(world, "parallel.dp=2", "model.dropout=0.1", "train.compile=true", *AC)
    with compiling():
        ours, ref = dtrain_run(checkpointed, _grid(plain)), dtrain_run(plain, _grid(plain))
    compare_runs(ours, ref, None)  # bitwise
    return {"losses": ours["losses"]}


@pytest.mark.slow
def test_compiled_dropout_is_replayed_under_checkpointing(world2):
    """Inductor draws its own dropout masks (from the trainer's per-step seed); the recomputation in
    backward draws the same ones again."""
    world2.run(dropout_case)


SLOW_LAYOUTS = {
    "dp2-checkpointed": ("parallel.dp=2", *AC),
    "zero1": ("parallel.dp=2", "parallel.zero=1"),
    "zero3": ("parallel.dp=2", "parallel.zero=3"),  # gathered and freed by hooks around the blocks
    "zero3-checkpointed": ("parallel.dp=2", "parallel.zero=3", *AC),
    "pp2": ("parallel.pp=2", "parallel.dp=1", "parallel.pp_schedule=1f1b"),
    "lora-zero3": ("parallel.dp=2", "parallel.zero=3", "model.lora.rank=4"),  # frozen base, sharded
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", SLOW_LAYOUTS.values(), ids=SLOW_LAYOUTS.keys())
def test_compiled_blocks_train_as_eager(world2, layout):
    _check(world2.run(compiled_case, layout))


def resume_case(out_dir: str) -> dict:
    """A compiled run's checkpoint resumes an eager run, which continues as the compiled one."""
    from dtrain.trainer import Trainer

    world = dist.get_world_size()
    common = ("parallel.dp=2", "train.steps=4", "run.ckpt_every=2", "run.keep_checkpoints=0")

    def fit(*overrides: str) -> list[dict]:
        cfg = tiny_config(world, *common, *overrides)
        return Trainer(cfg, _grid(cfg), torch.device("cpu")).fit()

    with compiling():
        compiled = fit(f"run.out_dir={out_dir}/compiled", "train.compile=true")
        resumed = fit(f"run.out_dir={out_dir}/eager", f"run.resume={out_dir}/compiled/checkpoints/step_2")
    return {"compiled": [r["loss"] for r in compiled[2:]], "resumed": [r["loss"] for r in resumed]}


@pytest.mark.slow
def test_compiled_checkpoint_resumes_eager(world2, tmp_path):
    info = world2.run(resume_case, str(tmp_path))[0]
    torch.testing.assert_close(torch.tensor(info["resumed"]), torch.tensor(info["compiled"]), **FP64)


def test_estimate_ignores_compile():
    """`dtrain estimate` builds the model on the meta device, where nothing is compiled: the same bytes."""
    from dtrain.analysis.estimate import estimate_model_states

    layout = [*TINY, "parallel.zero=3", *AC]
    plain = estimate_model_states(load_config(None, layout), 2)
    compiled = estimate_model_states(load_config(None, [*layout, "train.compile=true"]), 2)
    assert compiled == plain

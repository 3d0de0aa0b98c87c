"""`dtrain estimate` predicts, from the config alone (meta tensors, no process group), the bytes of
parameters, gradients and optimizer states a rank holds after a step: it must equal what a real run's
`Trainer.held_bytes()` measures, byte for byte (the estimator builds the same modules and gradient
synchronisation on the meta device)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.distributed as dist

from dtrain.analysis.estimate import estimate_model_states, meta_rank
from dtrain.config import ConfigError, load_config
from dtrain.model import count_params
from dtrain.validation import validate
from parallel.mixed_precision import to_compute_
from parallel.precision import DTYPES
from tests import harness
from tests.reference import TINY, tiny_config

ROOT = harness.repo_root()

# Sizes that are not multiples of 4, so buckets get padded to a multiple of dp.
ODD = ("model.d_model=42", "model.n_heads=3", "model.n_kv_heads=1", "model.vocab_size=97")
SMALL_BUCKETS = ("parallel.bucket_mb=0.01",)  # ~10 KB: many buckets, several of them padded
TIED = ("model.tie_embeddings=true",)

# Every stage and valid offload, each on the odd-sized model (padding), with several small buckets or a tied
# embedding (the head in the embedding's ZeRO-3 unit); one case keeps the plain tiny model.
CASES = {
    "ddp-buckets": (0, "none", ODD + SMALL_BUCKETS),
    "ddp-tied": (0, "none", ODD + TIED),
    "zero1-buckets": (1, "none", ODD + SMALL_BUCKETS),
    "zero1-offload-tied-buckets": (1, "optimizer", ODD + TIED + SMALL_BUCKETS),
    "zero2-tied": (2, "none", ODD + TIED),
    "zero2-offload-buckets": (2, "optimizer", ODD + SMALL_BUCKETS),
    "zero3-plain": (3, "none", ()),
    "zero3-offload-tied": (3, "optimizer", ODD + TIED),
    "zero3-offload-all": (3, "all", ODD),
    "zero3-offload-all-tied": (3, "all", ODD + TIED),
    # 16-bit parameters: 2-byte buckets and shards, fp32 masters with the optimizer state.
    "ddp-bf16-grads-bf16": (
        0,
        "none",
        (*ODD, *SMALL_BUCKETS, "train.precision=bf16", "parallel.grad_dtype=bf16"),
    ),
    "zero1-bf16-buckets": (1, "none", (*ODD, *SMALL_BUCKETS, "train.precision=bf16")),
    "zero2-fp16-offload": (2, "optimizer", (*ODD, "train.precision=fp16")),
    "zero3-bf16-offload-all-tied": (3, "all", (*ODD, *TIED, "train.precision=bf16")),
}


def overrides(stage: int, offload: str, extra: tuple[str, ...]) -> list[str]:
    # The smallest step (one 8-token sequence per rank): held bytes do not depend on the batch.
    cheap = ("train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=1", "train.seq_len=8")
    return [f"parallel.zero={stage}", f"parallel.offload={offload}", *cheap, *extra]


def measured_cases() -> dict:
    """Every case on this world: build a Trainer, take one step, read held_bytes()."""
    from dtrain.trainer import Trainer

    world = dist.get_world_size()
    out = {}
    torch.set_num_threads(1)
    for name, case in CASES.items():
        cfg = tiny_config(world, *overrides(*case))
        trainer = Trainer(cfg, harness.grid(dp=world), torch.device("cpu"))
        trainer.train_step()  # optimizer state exists after the first step
        out[name] = trainer.held_bytes()
    return out


@pytest.mark.parametrize("fixture", ["world2", "world4"])
def test_estimate_equals_measured_held_bytes(request, fixture):
    world = request.getfixturevalue(fixture)
    results = world.run(measured_cases)
    for name, case in CASES.items():
        est = estimate_model_states(load_config(None, [*TINY, *overrides(*case)]), world.size)
        want = {"device": est["device"], "host": est["host"]}
        for rank, measured in enumerate(results):
            assert measured[name] == want, (name, rank, measured[name], want)


MIXED = {
    "fp32": ("train.precision=fp32",),
    "bf16": ("train.precision=bf16",),
    "bf16-grads-bf16": ("train.precision=bf16", "parallel.grad_dtype=bf16"),
    "fp16": ("train.precision=fp16",),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("precision", MIXED.values(), ids=MIXED.keys())
@pytest.mark.parametrize(
    ("stage", "offload"), [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "all")]
)
def test_model_state_bytes_per_parameter_equal_the_formula(stage, offload, precision, world):
    """On the tiny model (every bucket and unit a multiple of 4 elements: no padding) the bytes held per
    parameter equal docs/formulas.md's, exactly, per stage, precision and gradient dtype: e.g. ZeRO-1 bf16
    at dp N holds 2 + 4 + 12/N (2 + 2 + 12/N with bf16 gradients), ZeRO-3 (2 + 4 + 12)/N."""
    from dtrain.analysis.estimate import formula_bytes_per_param

    cfg = load_config(None, [*TINY, *overrides(stage, offload, precision)])
    est = estimate_model_states(cfg, world, communication=False)
    want = formula_bytes_per_param(validate(cfg, world), 4, world)
    for where in ("device", "host"):
        for kind, per_param in want[where].items():
            assert est[where][kind] == per_param * est["params"], (
                where,
                kind,
                est[where][kind] / est["params"],
            )


def test_small_buckets_are_several_and_padded():
    """The bucket case above really exercises the planning: several buckets, some padded for dp=4."""
    cfg = tiny_config(4, *overrides(1, "none", ODD + SMALL_BUCKETS))
    built = meta_rank(cfg, 0)
    numels = [b.numel for b in built.grad_sync.buckets]
    assert len(numels) > 5
    assert any(n % 4 for n in numels)
    assert sum(numels) == sum(p.numel() for p in built.model.parameters())


def test_large_model_on_meta_matches_formulas():
    """A 1B model costs nothing to estimate (meta tensors) and lands on docs/formulas.md's bytes per
    parameter (the config trains in bf16: 2-byte parameter shards, fp32 gradient shards, fp32 masters and
    moments)."""
    cfg = load_config(os.path.join(ROOT, "configs/gpu_1b.yaml"), ["parallel.zero=3", "parallel.offload=all"])
    est = estimate_model_states(cfg, 8)
    n = est["params"]
    assert 0.9e9 < n < 1.1e9
    assert est["device"]["params"] == 0 and est["device"]["optimizer"] == 0
    assert abs(est["device"]["grads"] / n - 4 / 8) < 1e-6
    assert abs(est["host"]["params"] / n - 2 / 8) < 1e-6
    assert abs(est["host"]["optimizer"] / n - 12 / 8) < 1e-6
    assert "docs/formulas.md ZeRO-3 offload=all, N=8" in est["formula"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_hybrid_sharding_holds_the_states_of_zero_over_the_shard_group(stage):
    """dp 8 in shard groups of 2 holds, per rank, what ZeRO over dp 2 holds: N is the shard group, the
    replicas add nothing. The communication report names the replica axis."""
    cheap = ("train.steps=1", "train.micro_batch_size=1", "train.seq_len=8", *ODD, *SMALL_BUCKETS)
    zero = (f"parallel.zero={stage}", *cheap)
    hybrid = estimate_model_states(load_config(None, [*TINY, *zero, "parallel.dp_shard=2"]), 8)
    plain = estimate_model_states(load_config(None, [*TINY, *zero]), 2)
    assert (hybrid["device"], hybrid["host"]) == (plain["device"], plain["host"])
    assert "N=2" in hybrid["formula"] and hybrid["layout"]["dp_shard"] == 2
    axes = {key.split()[0] for key in hybrid["stages"][0]["communication"]["by_axis_op"]}
    assert {"dp_shard", "dp_replicate"} <= axes and "dp" not in axes


def test_pipeline_ranks_hold_their_own_chunks():
    cfg = load_config(None, [*TINY, "parallel.pp=2", "model.n_layers=3"])
    est = estimate_model_states(cfg, 4)
    assert est["layout"]["dp"] == 2 and len(est["stages"]) == 2
    assert sum(s["params"] for s in est["stages"]) == count_params(cfg.model)["total"]
    for s in est["stages"]:
        assert s["device"]["params"] == 4 * s["params"]
        assert s["device"]["optimizer"] == 8 * s["params"]


def test_16_bit_layouts_report_their_communication():
    """In bf16 the report gives tensor, pipeline, expert and context traffic (comm_volume's count, which
    test_ledger.py holds to a real step); pipeline sends are activations only, half their fp32 bytes."""
    moe = ("model.moe.num_experts=4", "model.moe.top_k=2")
    cases = {
        "tp all-reduce": ("parallel.tp=2",),
        "pp send": ("parallel.pp=2",),
        "ep all-to-all": ("parallel.ep=2", *moe),
        "cp send": ("parallel.cp=2",),
    }
    for key, overrides in cases.items():
        sent = {}
        for precision in ("fp32", "bf16"):
            est = estimate_model_states(
                load_config(None, [*TINY, f"train.precision={precision}", *overrides]), 2
            )
            comm = est["stages"][0]["communication"]
            assert "not_modelled" not in comm, (key, precision, comm)
            sent[precision] = comm["by_axis_op"][key]
        assert sent["bf16"] < sent["fp32"], key
        if key == "pp send":
            assert 2 * sent["bf16"] == sent["fp32"], sent


def test_bad_world_is_a_config_error():
    with pytest.raises(ConfigError, match="does not match the world size"):
        estimate_model_states(load_config(None, [*TINY, "parallel.dp=2"]), 3)


def run_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`dtrain estimate ARGS` in this process (the README runs it as a command); configs/ from the root."""
    args = tuple(os.path.join(ROOT, a) if a.startswith("configs/") else a for a in args)
    return subprocess.CompletedProcess(args, *harness.main_in_process(capsys, "estimate", *args))


def test_cli_prints_the_figures(capsys):
    out = run_cli(capsys, "configs/tiny.yaml", "parallel.zero=2")
    assert out.returncode == 0, out.stderr
    # configs/tiny.yaml: dp=-1 with dist.nproc_per_node=2, so the default world is 2.
    est = estimate_model_states(load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["parallel.zero=2"]), 2)
    text = out.stdout
    assert "world 2 = dp 2" in text and "ZeRO-2" in text
    for where in ("device", "host"):
        for value in est[where].values():
            assert f"{value:,}" in text
    assert "docs/formulas.md ZeRO-2, N=2" in text


def test_cli_bad_config_is_one_line(capsys):
    # A world that does not fit the config fails the same way (test_bad_world_is_a_config_error).
    out = run_cli(capsys, "configs/tiny.yaml", "parallel.zero=5")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: "), out.stderr


def saved_activation_case(overrides: tuple[str, ...]) -> tuple[int, float]:
    """One micro-batch through this rank's chunk with every tensor autograd saves for backward counted
    once per storage (parameters and buffers excluded): what activation memory is. Returns (measured,
    predicted per micro-batch)."""
    from dtrain.analysis.activations import activation_bytes
    from dtrain.parallelize import build_model_chunks
    from parallel.context_parallel import split_microbatch

    cfg = tiny_config(dist.get_world_size(), *overrides)
    p, t = cfg.parallel, cfg.train
    grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp)
    (c, chunk), *_ = build_model_chunks(cfg, grid, torch.device("cpu")).items()
    compute = DTYPES[t.precision]
    to_compute_(list(chunk.parameters()), compute)  # what the gradient synchronisation stores them in
    fixed = {q.untyped_storage().data_ptr() for q in [*chunk.parameters(), *chunk.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in fixed:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens, targets = (torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len)) for _ in "xy")
    context = {}
    if p.cp > 1:  # this rank's chunks of the sequence, as the trainer hands them over
        tokens, targets, context = split_microbatch((tokens, targets), p.cp, grid.coords.cp)
    seq = t.seq_len // p.cp // (p.tp if p.sp else 1)
    shape = (t.micro_batch_size, seq, cfg.model.d_model)
    x = tokens if c == 0 else torch.randn(shape, dtype=compute, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunk(x, targets if chunk.head is not None else None, **context)
    return sum(saved.values()), activation_bytes(cfg, grid.coords.pp)["per_microbatch"]


ACTIVATION_CASES = {
    "dp": ("world2", ()),
    "tp2": ("world2", ("parallel.tp=2",)),
    "tp2-sp-odd-vocab": ("world2", ("parallel.tp=2", "parallel.sp=true", "model.vocab_size=95")),
    "pp2-stages": ("world2", ("parallel.pp=2", "model.n_layers=3")),
    "tp4-sp-replicated-kv": ("world4", ("parallel.tp=4", "parallel.sp=true")),
    "tp2-pp2-sp": ("world4", ("parallel.tp=2", "parallel.pp=2", "parallel.sp=true")),
    "cp2": ("world2", ("parallel.cp=2",)),
    "cp2-tp2-sp": ("world4", ("parallel.cp=2", "parallel.tp=2", "parallel.sp=true")),
    "cp2-pp2-stages": ("world4", ("parallel.cp=2", "parallel.pp=2", "model.n_layers=3")),
    # 16-bit parameters: matmul inputs and outputs in 2 bytes, norms, softmax statistics and the loss in fp32
    "dp-bf16": ("world2", ("train.precision=bf16",)),
    "tp2-sp-odd-vocab-bf16": (
        "world2",
        ("parallel.tp=2", "parallel.sp=true", "model.vocab_size=95", "train.precision=bf16"),
    ),
    "pp2-stages-fp16": ("world2", ("parallel.pp=2", "model.n_layers=3", "train.precision=fp16")),
    "tp2-pp2-bf16": ("world4", ("parallel.tp=2", "parallel.pp=2", "train.precision=bf16")),
}


@pytest.mark.parametrize(("fixture", "overrides"), ACTIVATION_CASES.values(), ids=ACTIVATION_CASES.keys())
def test_activation_estimate_equals_the_bytes_autograd_saves(request, fixture, overrides):
    for measured, predicted in request.getfixturevalue(fixture).run(saved_activation_case, overrides):
        assert measured == predicted


def test_activation_estimate_counts_in_flight_microbatches_and_checkpointing():
    from dtrain.analysis.activations import activation_bytes

    base = [*TINY, "parallel.pp=2", "train.global_batch_size=32", "train.micro_batch_size=2"]
    gpipe = activation_bytes(validate_for([*base, "parallel.pp_schedule=gpipe"], 4), 0)
    one_f_one_b = activation_bytes(validate_for(base, 4), 0)
    assert gpipe["in_flight"] == 8 and one_f_one_b["in_flight"] == 2  # m, and pp - r
    assert gpipe["per_microbatch"] == one_f_one_b["per_microbatch"]
    ckpt = activation_bytes(validate_for([*base, "train.activation_checkpointing=true"], 4), 0)
    assert ckpt["total"] < one_f_one_b["total"] and ckpt["recompute"] > 0


def validate_for(overrides: list[str], world: int):
    from dtrain.validation import validate

    return validate(load_config(None, overrides), world)


LAYOUT_KEYS = ("tp", "pp", "dp", "ep", "zero")


def test_suggested_layouts_fit_the_budget_and_validate():
    from dtrain.analysis.estimate import peak_device_bytes
    from dtrain.analysis.suggest import layout_overrides, parse_bytes, suggest_layouts
    from dtrain.validation import validate

    cfg = load_config(None, [*TINY, "model.moe.num_experts=4"])
    budget = parse_bytes("1.5MiB")
    fits = suggest_layouts(cfg, 4, budget, top=100)
    assert fits and all(f["bytes"] <= budget for f in fits)
    assert {f["ep"] for f in fits} > {1} and {f["zero"] for f in fits} == {0, 1, 2, 3}
    assert [f["cost"] for f in fits] == sorted(f["cost"] for f in fits)
    everything = suggest_layouts(cfg, 4, parse_bytes("1GiB"), top=1000)
    assert len(everything) > len(fits)  # the budget excluded some
    for f in fits[:5]:
        trial = load_config(
            None,
            [*TINY, "model.moe.num_experts=4", *(f"parallel.{k}={f[k]}" for k in LAYOUT_KEYS)],
        )
        validate(trial, 4)
    # Each figure is the estimate of the layout its overrides name (the search shares one build between
    # a layout with and without activation checkpointing).
    for f in fits[::8]:
        trial = load_config(None, [*TINY, "model.moe.num_experts=4", *layout_overrides(f)])
        stages = estimate_model_states(trial, 4, communication=False)["stages"]
        assert f["bytes"] == max(peak_device_bytes(s) for s in stages), f
    with pytest.raises(ConfigError, match="--memory='lots' is not a size"):
        parse_bytes("lots")


def test_cli_suggests_layouts_for_a_memory_budget(capsys):
    out = run_cli(capsys, "configs/tiny.yaml", "--world", "4", "--memory", "2MiB")
    assert out.returncode == 0, out.stderr
    assert "layouts of 4 ranks that fit 2.00 MiB per rank: " in out.stdout and "fastest first" in out.stdout
    assert "activations (device):" in out.stdout
    bad = run_cli(capsys, "configs/tiny.yaml", "--memory", "2 parsecs")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("dtrain: error: --memory='2 parsecs'")

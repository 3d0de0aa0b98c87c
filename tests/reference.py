"""Reference training loops the equivalence tests compare against: torch's own DistributedDataParallel,
and one plain process on the full global batch. They share with dtrain only the model, the data, the
optimizer construction and the LR schedule; the parallelism, reduction, clipping and loss scaling are
torch's."""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dtrain.config import load_config
from dtrain.data import build_dataset, global_target_tokens, rank_microbatches
from dtrain.hf import HFWeights
from dtrain.model import Transformer, freeze, init_weights
from dtrain.trainer import build_optimizer, lr_at
from dtrain.validation import validate
from parallel.moe import aux_grad_scales, moe_layers, set_aux_grad_scale
from parallel.precision import DTYPES

TINY_MODEL = [
    "model.vocab_size=96",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=32",
]
TINY = [
    *TINY_MODEL,
    "train.seq_len=16",
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.lr=1e-2",
    "train.min_lr=1e-3",
    "train.grad_clip=1.0",
    "run.log_every=1000",
]


def tiny_config(world_size: int, *overrides: str):
    """The tiny training setup; with a model.init_from override the model is that folder's instead."""
    return copy.deepcopy(_validated(world_size, overrides))  # a copy: callers may change theirs


@functools.cache  # omegaconf takes tens of milliseconds a config, and cases build the same ones often
def _validated(world_size: int, overrides: tuple[str, ...]):
    from_folder = any(o.startswith("model.init_from=") for o in overrides)
    base = [o for o in TINY if o not in TINY_MODEL] if from_folder else TINY
    return validate(load_config(None, [*base, *overrides]), world_size)


@contextlib.contextmanager
def float64():
    """Build and train in float64: two layouts that compute the same function then agree to ~1e-14,
    which separates a wrong algorithm from fp32 rounding."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _autocast(precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=DTYPES[precision])


def _initial_model(cfg) -> Transformer:
    """The single-process model with dtrain's initial weights (seed or Hugging Face folder) and frozen
    parameters (train.freeze; with model.lora, adapters on a frozen base)."""
    model = Transformer(cfg.model)
    freeze(model, cfg.train.freeze)
    weights = HFWeights(cfg.model.init_from) if cfg.model.init_from else None
    init_weights(model, cfg.train.seed, weights.read if weights else None)
    return model


def _setup(cfg):
    """The pieces a reference shares with dtrain: model and initial weights, optimizer, data."""
    model = _initial_model(cfg)
    return model, build_optimizer(model, cfg.train), build_dataset(cfg, "train")


def _set_lr(opt, step: int, t) -> None:
    for g in opt.param_groups:
        g["lr"] = lr_at(step, t)


def reused(run):
    """A reference run's result depends only on its config, its group's ranks and the default dtype: the
    cases that train the same thing in other layouts get a copy of the first one's result in this worker
    process (each rank keeps its own, and every rank runs every case, so the ranks hit or miss together)."""
    results: dict = {}

    @functools.wraps(run)
    def cached(cfg, group=None) -> dict:
        key = (
            repr(cfg),
            tuple(dist.get_process_group_ranks(group or dist.group.WORLD)),
            torch.get_default_dtype(),
        )
        if key not in results:
            results[key] = run(cfg, group)
        return copy.deepcopy(results[key])

    return cached


@reused
def torch_ddp_run(cfg, group=None) -> dict:
    """Train `cfg.train.steps` steps with torch DDP over `group` (default: the world)."""
    t = cfg.train
    dp, rank = dist.get_world_size(group), dist.get_rank(group)
    model, opt, data = _setup(cfg)
    ddp = DistributedDataParallel(model, process_group=group)
    scaler = torch.amp.GradScaler("cpu", enabled=t.precision == "fp16")
    losses, norms = [], []
    for step in range(t.steps):
        _set_lr(opt, step, t)
        tokens = max(global_target_tokens(data, step, t.global_batch_size), 1)
        micro = rank_microbatches(data, step, rank, dp, t.micro_batch_size, t.global_batch_size)
        # MoE aux losses weigh like token losses (targets / global targets), times dp against DDP's mean.
        shares = aux_grad_scales(micro, tokens, scaler.get_scale() * dp)
        local = torch.zeros(())
        for j, (x, y, *context) in enumerate(micro):
            set_aux_grad_scale(moe_layers(model), shares[j])
            with contextlib.nullcontext() if j == len(micro) - 1 else ddp.no_sync():
                with _autocast(t.precision):
                    loss_sum = ddp(x, y, **(context[0] if context else {}))
                # DDP averages over ranks; our loss is already normalised by the global token count.
                scaler.scale(loss_sum / tokens * dp).backward()
            local += loss_sum.detach()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        dist.all_reduce(local, group=group)
        losses.append(float(local) / tokens)
        norms.append(float(norm))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return {"losses": losses, "grad_norms": norms, "params": full_params(model), "frozen": frozen}


@reused
def torch_fsdp2_run(cfg, group=None) -> dict:
    """Train `cfg.train.steps` steps with torch's FSDP2 (`fully_shard` on every block and on the root)
    over `group`, with its mixed precision: parameters all-gathered and computed in the precision's
    dtype, no autocast, gradients reduced in parallel.grad_dtype into fp32 sharded parameters (the masters
    AdamW steps).
    fp16 adds torch's ShardedGradScaler, whose overflow check is agreed over the group.
    With parallel.tp > 1 (group: the world) the model is first split by torch's DTensor tensor parallelism
    (torchtitan's plan, dtrain.bench.tensor_parallel) over the inner mesh axis and FSDP2 shards over the
    outer one: each rank then rounds its 16-bit partial sums before the tp all-reduce (or reduce-scatter)
    as a tensor-parallel layout does, which FSDP2 alone, computing each matmul whole, never does."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    from torch.distributed.tensor.parallel import loss_parallel

    from dtrain.bench.tensor_parallel import clip_grads_by_mesh, pytorch_model

    t, tp = cfg.train, cfg.parallel.tp
    group = group or dist.group.WORLD
    if tp == 1:
        mesh = DeviceMesh.from_group(group, "cpu")
        dp, rank = dist.get_world_size(group), dist.get_rank(group)
        model, loss_context = _initial_model(cfg), contextlib.nullcontext
    else:
        assert group is dist.group.WORLD, "tensor parallelism in the reference spans the world"
        mesh_2d = init_device_mesh("cpu", (dist.get_world_size() // tp, tp), mesh_dim_names=("dp", "tp"))
        mesh, dp, rank = mesh_2d["dp"], mesh_2d["dp"].size(), mesh_2d.get_local_rank("dp")
        model, loss_context = pytorch_model(cfg, mesh_2d["tp"]), loss_parallel
    dtype = DTYPES[t.precision]
    # The blocks' floating inputs stay as the model passes them: the residual stream is already 16-bit,
    # and the rotary tables stay fp32 (FSDP2 would otherwise round them to 16 bits at every block).
    reduce = DTYPES[cfg.parallel.grad_dtype]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce, cast_forward_inputs=False)
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt, data = build_optimizer(model, t), build_dataset(cfg, "train")  # AdamW on the fp32 shards
    # Every rank's overflow check agrees (tp ranks hold different gradient shards).
    scaler = ShardedGradScaler("cpu", enabled=t.precision == "fp16", process_group=dist.group.WORLD)
    losses, norms = [], []
    for step in range(t.steps):
        _set_lr(opt, step, t)
        tokens = max(global_target_tokens(data, step, t.global_batch_size), 1)
        micro = rank_microbatches(data, step, rank, dp, t.micro_batch_size, t.global_batch_size)
        shares = aux_grad_scales(micro, tokens, scaler.get_scale() * dp)
        local = torch.zeros(())
        for j, (x, y, *context) in enumerate(micro):
            set_aux_grad_scale(moe_layers(model), shares[j])
            model.set_requires_gradient_sync(j == len(micro) - 1)  # reduce-scatter at the last only
            with loss_context():
                loss_sum = model(x, y, **(context[0] if context else {}))
                # FSDP2 averages over dp ranks; our loss is already normalised by the global token count.
                scaler.scale(loss_sum / tokens * dp).backward()
            local += _local_value(loss_sum.detach()).float()
        scaler.unscale_(opt)
        norm = clip_grads_by_mesh(list(model.parameters()), t.grad_clip or float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        dist.all_reduce(local, group=mesh.get_group())
        losses.append(float(local) / tokens)
        norms.append(float(norm))
    return {
        "losses": losses,
        "grad_norms": norms,
        "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
    }


def _local_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def single_process_run(cfg) -> dict:
    """The same training in one process on the whole global batch, no torch.distributed at all."""
    t = cfg.train
    model, opt, data = _setup(cfg)
    losses, norms = [], []
    for step in range(t.steps):
        _set_lr(opt, step, t)
        tokens = max(global_target_tokens(data, step, t.global_batch_size), 1)
        total = torch.zeros(())
        micro = rank_microbatches(data, step, 0, 1, t.micro_batch_size, t.global_batch_size)
        for (x, y, *context), share in zip(micro, aux_grad_scales(micro, tokens), strict=True):
            set_aux_grad_scale(moe_layers(model), share)
            loss_sum = model(x, y, **(context[0] if context else {}))
            (loss_sum / tokens).backward()
            total += loss_sum.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad()
        losses.append(float(total) / tokens)
        norms.append(float(norm))
    return {"losses": losses, "grad_norms": norms, "params": full_params(model)}


def dtrain_run(cfg, grid) -> dict:
    """Our trainer; parameters come back canonical (tensor-parallel shards gathered)."""
    from dtrain.trainer import Trainer

    trainer = Trainer(cfg, grid, torch.device("cpu"))
    results = [trainer.train_step() for _ in range(cfg.train.steps)]
    return {
        "losses": [r.loss for r in results],
        "grad_norms": [r.grad_norm for r in results],
        "skipped": [r.skipped for r in results],
        "moe": [r.moe for r in results],
        "params": trainer.canonical_state(),
        "trainer": trainer,
    }


def layout_matches_ddp(
    layout: tuple[str, ...], overrides: tuple[str, ...], fp32_parameters: bool = False
) -> dict:
    """Train the tiny model in `layout` (parallel.* overrides) and compare with torch DDP over every rank
    on the unsharded model: in float64 every loss, grad norm and parameter to FP64, in fp32 losses and
    grad norms (and with `fp32_parameters` the parameters) to FP32 (tests/tolerances.py says why). Run on
    every rank; each compares the parameters it holds (a pipeline stage holds some). Returns our fp32
    losses, the names of the parameters held and the held bytes."""
    from tests import harness
    from tests.tolerances import FP32, FP64

    world = dist.get_world_size()
    cfg = tiny_config(world, *layout, *overrides)
    # Keys of `layout` outside parallel.* (the global batch, checkpointing) describe the training itself.
    # The reference takes one micro-batch per rank: with the loss normalised by the global token count,
    # micro-batching does not change the computed training. It does with experts (capacity and aux
    # losses are per micro-batch), so MoE references keep the micro-batches.
    overrides = (*overrides, *(o for o in layout if not o.startswith("parallel.")))
    reference_overrides = overrides
    if not cfg.model.moe.num_experts:
        reference_overrides += (f"train.micro_batch_size={cfg.train.global_batch_size // world}",)
    p = cfg.parallel
    grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, dp_shard=p.dp_shard)
    with float64():
        ours, ref = dtrain_run(cfg, grid), torch_ddp_run(tiny_config(world, *reference_overrides))
        compare_runs(ours, ref, FP64)
    held = sorted(ours["params"])
    ours, ref = dtrain_run(cfg, grid), torch_ddp_run(tiny_config(world, *reference_overrides))
    compare_runs(ours if fp32_parameters else {**ours, "params": {}}, ref, FP32)  # no params: losses, norms
    return {
        "losses": ours["losses"],
        "held": held,
        "all": sorted(ref["params"]),
        "moe": ours["moe"],
        "held_bytes": ours["trainer"].held_bytes(),
        "pp_rank": grid.coords.pp,
    }


def compare_runs(ours: dict, ref: dict, tol: dict | None) -> None:
    """tol=None: bitwise equality. Otherwise losses and grad norms elementwise, parameters per tensor in
    the 2-norm (see tests/tolerances.py). `ours` may hold a subset of the parameters (a pipeline stage)."""
    assert ours["params"].keys() <= ref["params"].keys(), set(ours["params"]) - set(ref["params"])
    if tol is None:
        assert ours["losses"] == ref["losses"]
        assert ours["grad_norms"] == ref["grad_norms"]
        for name, value in ours["params"].items():
            assert torch.equal(value, ref["params"][name]), name
        return
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), **tol)
    torch.testing.assert_close(torch.tensor(ours["grad_norms"]), torch.tensor(ref["grad_norms"]), **tol)
    for name in ref.get("frozen", ()):  # never trained: bitwise the initial weights in both
        if name in ours["params"]:
            assert torch.equal(ours["params"][name], ref["params"][name]), f"frozen {name} changed"
    for name, value in ours["params"].items():
        err = float((value - ref["params"][name]).norm() / ref["params"][name].norm())
        assert err <= tol["rtol"], f"{name}: relative 2-norm difference {err:.2e} > {tol['rtol']:.0e}"


def relative_errors(run: dict, ref: dict) -> dict[str, float]:
    """Largest relative difference of the losses, of the grad norms, and of any parameter tensor (2-norm)
    between two runs (`run` may hold a subset of the parameters)."""
    return {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref["losses"], strict=True)),
        "grad_norm": max(
            abs(a - b) / abs(b) for a, b in zip(run["grad_norms"], ref["grad_norms"], strict=True)
        ),
        "params": max(
            float((v - ref["params"][n]).norm() / ref["params"][n].norm()) for n, v in run["params"].items()
        ),
    }


def assert_held_bytes_are_estimated(results: list[dict], overrides: list[str], world: int) -> None:
    """Every rank's measured model-state bytes (results of the ranks, each with "held_bytes" and
    "pp_rank") equal `dtrain estimate`'s figure for its pipeline stage, from the config alone."""
    from dtrain.analysis.estimate import estimate_model_states

    stages = estimate_model_states(load_config(None, overrides), world)["stages"]
    for rank, r in enumerate(results):
        predicted = stages[r.get("pp_rank", 0)]
        assert r["held_bytes"] == {"device": predicted["device"], "host": predicted["host"]}, rank


def assert_within_fsdp2_noise(
    ours: dict, world: int, overrides: tuple[str, ...], micro: int, tensor_parallel: tuple[str, ...] = ()
) -> None:
    """16-bit runs: `ours` against torch FSDP2 with our micro-batch size, within LOW_PRECISION_NOISE_FACTOR
    times FSDP2's own drift when only the micro-batch size changes (a quarter of it): what rounding alone
    moves in the same test (tests/tolerances.py). `tensor_parallel` (parallel.tp and parallel.sp
    overrides) puts torch's DTensor tensor parallelism under FSDP2 in both reference runs."""
    from tests.tolerances import LOW_PRECISION_NOISE_FACTOR

    overrides = (*overrides, *tensor_parallel)
    reference = torch_fsdp2_run(tiny_config(world, *overrides, f"train.micro_batch_size={micro}"))
    variant = torch_fsdp2_run(tiny_config(world, *overrides, f"train.micro_batch_size={micro // 4}"))
    ours_err, noise = relative_errors(ours, reference), relative_errors(variant, reference)
    for what in ours_err:
        assert ours_err[what] <= LOW_PRECISION_NOISE_FACTOR * noise[what], (what, ours_err[what], noise[what])

"""The composition: what one rank holds for training, built in the order it happens.

    grid (given) -> layers: tensor (+ sequence) parallel parts over tp, experts over ep
                 -> the pipeline chunks of this rank
                 -> initial weights, a function of (seed, name, full shape) only
                 -> train.compile: each block's forward compiled (inductor), after the weights are in
                    place and before gradient synchronisation hooks the modules; not on the meta device
                 -> gradient synchronisation and optimizer: DDP + AdamW, or ZeRO 1/2/3 (+ offload),
                    dense state over dp x cp and expert state over the expert-data-parallel group
                    (hybrid sharding: over a shard group of parallel.dp_shard ranks, replicated across)
                 -> schedule and executor (which chunk runs which micro-batch when)

The trainer calls `parallelize` on its device with a `parallel.grid.ProcessGrid`. `dtrain estimate` and the
communication count call it on the meta device with a `parallel.grid.MetaGrid`: the same modules, buckets,
shards and units, with shapes and no storage, so the bytes they predict are read off the objects training
builds (`GradSync.held_bytes`, the buckets' parameters), not recomputed beside them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dtrain.config import Config
from dtrain.hf import HFWeights
from dtrain.model import Transformer, compile_blocks, init_weights
from dtrain.parallel_layers import layers_for
from dtrain.stage import Stage, build_chunks, tied_params, zero3_units
from parallel.data_parallel import DataParallelAdamW
from parallel.grad_sync import AdamWConfig, GradSync
from parallel.grid import Grid
from parallel.mixed_precision import to_compute_
from parallel.precision import dtype_policy
from parallel.zero import WholeParams, ZeroDataParallel, plan_zero_buckets
from parallel.zero3 import zero3
from parallel.zero_experts import ZeroWithExperts, split_expert_units


@dataclass
class Parallelized:
    model: Stage
    grad_sync: GradSync


def parallelize(cfg: Config, grid: Grid, device: torch.device) -> Parallelized:
    chunks = build_model_chunks(cfg, grid, device)
    grad_sync = build_grad_sync(cfg, grid, chunks)
    return Parallelized(Stage(cfg, grid, chunks, device), grad_sync)


def build_model_chunks(cfg: Config, grid: Grid, device: torch.device) -> dict[int, Transformer]:
    """This rank's chunks with their initial weights (shapes only on the meta device)."""
    layers = layers_for(cfg.model, grid, sequence_parallel=cfg.parallel.sp)
    meta = device.type == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():
        chunks = build_chunks(cfg, layers, grid.coords.pp)
    if not meta:
        # The full tensor from (seed, name), or from the Hugging Face folder, then this rank's slice.
        weights = HFWeights(cfg.model.init_from) if cfg.model.init_from else None
        for chunk in chunks.values():
            init_weights(chunk, cfg.train.seed, weights.read if weights else None)
            chunk.to(device)
        if weights:
            weights.close()
        if cfg.train.compile:  # the estimate (meta) sees the same modules: compiling adds no bytes
            for chunk in chunks.values():
                compile_blocks(chunk)
    return chunks


def build_grad_sync(cfg: Config, grid: Grid, chunks: dict[int, Transformer]) -> GradSync:
    """Dense gradients are summed (and ZeRO state sharded) over dp x cp; with ep > 1 expert gradients over
    the expert-data-parallel group x cp, whose ranks hold the same experts. With parallel.dp_shard < dp x cp
    ZeRO shards within the grid's shard groups (dp_shard, edp_shard) and sums each shard over the replica
    groups (dp_replicate, edp_replicate); the default shard group is the whole group, one replica."""
    p, t = cfg.parallel, cfg.train
    adamw = AdamWConfig(t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
    tied = tuple(tied_params(cfg, chunks))
    dtypes = dtype_policy(t.precision, p.grad_dtype)  # 16-bit parameters, fp32 masters
    if dtypes.param_dtype is not None:  # frozen weights get no master, only the compute dtype
        to_compute_(
            [q for c in chunks.values() for q in c.parameters() if not q.requires_grad], dtypes.param_dtype
        )
    groups = {
        "tp_group": grid.tp_group,
        "pp_group": grid.pp_group,
        "embed_group": grid.embed_group,
        "dtypes": dtypes,
    }
    experts_apart = p.ep > 1
    if p.zero == 0:
        return DataParallelAdamW(
            nn.ModuleList(chunks.values()),
            grid.dp_cp_group,
            p.bucket_mb,
            adamw,
            expert_group=grid.edp_cp_group if experts_apart else None,
            ep_group=grid.ep_group,
            tied=tied,
            **groups,
        )

    def zero(units: list, group, replica_group) -> ZeroDataParallel:
        facts = {**groups, "isolate": tied, "replica_group": replica_group}
        if p.zero == 3:
            return zero3(units, group, adamw, p.offload, **facts)
        params = [q for unit_params, _ in units for q in unit_params]
        plan = plan_zero_buckets(params, int(p.bucket_mb * 2**20), tied)
        frozen = WholeParams([q for q in params if not q.requires_grad])  # held whole, never reduced
        return ZeroDataParallel(
            plan, group, p.zero, adamw, p.offload == "optimizer", residency=frozen, **facts
        )

    params = [q for chunk in chunks.values() for q in chunk.parameters()]
    units = zero3_units(cfg, chunks) if p.zero == 3 else [(params, [])]
    dense_zero = (grid.dp_shard_group, grid.dp_replicate_group)
    if not experts_apart:
        return zero(units, *dense_zero)
    dense, experts = split_expert_units(units)
    expert_zero = (grid.edp_shard_group, grid.edp_replicate_group)
    return ZeroWithExperts(zero(dense, *dense_zero), zero(experts, *expert_zero), grid.ep_group)

"""This rank's part of the model: its pipeline chunks (tensor-parallel layers where tp > 1), the schedule
that runs them and the executor; the ZeRO-3 units and tied parameters that gradient synchronisation
needs to know of.

The n_layers blocks are cut into C = pp * v chunks (v = parallel.pp_virtual_stages with the interleaved
schedule, else 1), chunk c getting blocks [c * L // C, (c + 1) * L // C): sizes differ by at most one.
The embedding goes with chunk 0, the final norm, head and loss with chunk C - 1; chunk c lives on
pipeline rank c % pp. Without pipelining this is one chunk holding the whole model, run by the same
executor with the 1F1B order (forward and backward of each micro-batch in turn).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dtrain.config import Config, microbatches_per_rank
from dtrain.model import Layers, Transformer, freeze, is_moe_block
from parallel import pipeline_schedules
from parallel.grid import Grid
from parallel.moe import MoELayer
from parallel.pipeline import PipelineExecutor
from parallel.sharding import set_sharding, sharding_of


def n_chunks(cfg: Config) -> int:
    p = cfg.parallel
    return p.pp * (p.pp_virtual_stages if p.pp_schedule == "interleaved" and p.pp > 1 else 1)


def balanced_split(n_layers: int, chunks: int) -> list[range]:
    if n_layers < chunks:
        raise ValueError(
            f"model.n_layers={n_layers} cannot be split into {chunks} pipeline chunks "
            f"(parallel.pp * pp_virtual_stages); every chunk needs a block"
        )
    return [range(c * n_layers // chunks, (c + 1) * n_layers // chunks) for c in range(chunks)]


def build_chunks(cfg: Config, layers: Layers, pp_rank: int) -> dict[int, Transformer]:
    """The chunks pipeline rank `pp_rank` holds, by global chunk index, with uninitialised weights."""
    p = cfg.parallel
    total = n_chunks(cfg)
    chunks: dict[int, Transformer] = {}
    for c, block_ids in enumerate(balanced_split(cfg.model.n_layers, total)):
        if c % p.pp != pp_rank:
            continue
        chunk = Transformer(
            cfg.model,
            layers,
            block_ids=block_ids,
            has_embedding=c == 0,
            has_head=c == total - 1,
            activation_checkpointing=cfg.train.activation_checkpointing,
        )
        if cfg.model.tie_embeddings and chunk.head is not None and chunk.embed is None:
            # The head on the last stage copies the embedding of the first: same initial value
            # (init_weights reads it under the embedding's name), gradients summed, counted once.
            w = chunk.head.weight
            set_sharding(w, dataclasses.replace(sharding_of(w), duplicate_of="embed.weight"))
        freeze(chunk, cfg.train.freeze)
        chunks[c] = chunk
    return chunks


def tied_params(cfg: Config, chunks: dict[int, Transformer]) -> list[nn.Parameter]:
    """The embedding (first stage) and the head (last stage) when they are tied across stages: their
    gradients are summed over the grid's embed_group."""
    if not cfg.model.tie_embeddings or cfg.parallel.pp == 1:
        return []
    return [
        layer.weight for chunk in chunks.values() for layer in (chunk.embed, chunk.head) if layer is not None
    ]


def zero3_units(cfg: Config, chunks: dict[int, Transformer]) -> list:
    """ZeRO-3 units in forward order: (parameters, spans of forward that use them). The embedding, each
    block, and the final norm with the head; a head tied to the embedding is a second span of the
    embedding's unit."""
    units = []
    across_stages = bool(tied_params(cfg, chunks))
    for chunk in chunks.values():
        tied = chunk.head is not None and chunk.embed is not None and chunk.head.weight is chunk.embed.weight
        if chunk.embed is not None:
            spans = [(chunk.embed, chunk.embed)] + ([(chunk.head, chunk.head)] if tied else [])
            units.append(([chunk.embed.weight], spans))
        units += [(list(block.parameters()), [(block, block)]) for block in chunk.blocks.values()]
        if chunk.head is not None and chunk.embed is None and across_stages:
            # A head tied to another stage's embedding is a unit of its own, sharded like it.
            units.append(([chunk.norm.weight], [(chunk.norm, chunk.norm)]))
            units.append(([chunk.head.weight], [(chunk.head, chunk.head)]))
        elif chunk.head is not None:
            params = [chunk.norm.weight] + ([] if tied else [chunk.head.weight])
            units.append((params, [(chunk.norm, chunk.norm if tied else chunk.head)]))
    return units


class Stage:
    """This rank's chunks with the schedule and the executor that run them (dtrain.parallelize builds
    it)."""

    def __init__(self, cfg: Config, grid: Grid, chunks: dict[int, Transformer], device: torch.device):
        self.cfg, self.grid, self.device = cfg, grid, device
        p = cfg.parallel
        self.chunks = chunks
        self.modules = nn.ModuleList(chunks.values())
        m = microbatches_per_rank(cfg)
        schedule = p.pp_schedule if p.pp > 1 else "1f1b"
        self.train_actions = pipeline_schedules.build(schedule, p.pp, m, p.pp_virtual_stages)[grid.coords.pp]
        # Evaluation: forwards only, chunk by chunk (GPipe's forward half, deadlock-free for any v).
        self.eval_actions = [pipeline_schedules.Action("F", c, i) for c in chunks for i in range(m)]
        # A stage boundary carries this rank's tokens: seq / cp of them, split again over tp under SP.
        seq = cfg.train.seq_len // p.cp // (grid.size("tp") if p.sp else 1)
        self.executor = PipelineExecutor(
            chunks,
            n_chunks(cfg),
            grid.pp_group,
            activation_shape=lambda rows: (rows, seq, cfg.model.d_model),
            dtype=next(self.modules.parameters()).dtype,
            device=device,
            # The input-gradient-first backward keeps a micro-batch's graph between its two passes. Not
            # under ZeRO-3, whose units are freed only once their weights have gradients (every unit of
            # the chunk would be gathered at once), nor under activation checkpointing, which recomputes a
            # block in every backward call that unpacks it. A compiled block falls back by itself.
            input_grad_first=p.pp_split_backward and p.zero < 3 and not cfg.train.activation_checkpointing,
        )

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Canonical names: block names carry their global index, so chunks never collide."""
        for chunk in self.chunks.values():
            yield from chunk.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def train(self, mode: bool = True) -> None:
        self.modules.train(mode)

    def moe_layers(self) -> dict:
        """This rank's mixture-of-experts MLPs by global block index."""
        return {
            int(i): block.mlp
            for chunk in self.chunks.values()
            for i, block in chunk.blocks.items()
            if isinstance(block.mlp, MoELayer)
        }

    def routing_metrics(self) -> dict:
        """Per MoE layer, for the step just taken: aux and z loss (means over the global batch's
        micro-batches, unscaled by their coefficients), the share of routed slots dropped and the slots
        routed to each expert. One all-reduce over the world: a layer lives on one pipeline stage, data
        ranks route their own tokens and tensor ranks hold shares of them, so the sum over every rank is
        the global figure."""
        m, t = self.cfg.model, self.cfg.train
        if not m.moe.num_experts:
            return {}
        held = self.moe_layers()
        ids = [i for i in range(m.n_layers) if is_moe_block(m, i)]
        stats = torch.zeros(len(ids), 3 + m.moe.num_experts, dtype=torch.float64, device=self.device)
        for row, i in enumerate(ids):
            if i in held:
                stats[row] = held[i].take_stats()
        dist.all_reduce(stats)
        microbatches = t.global_batch_size // t.micro_batch_size
        slots = t.global_batch_size * t.seq_len * m.moe.top_k
        out = {"moe/aux_loss": 0.0, "moe/z_loss": 0.0}
        for (aux, z, dropped, *counts), i in zip(stats.tolist(), ids, strict=True):
            out[f"moe/layer{i}/aux_loss"] = aux / microbatches
            out[f"moe/layer{i}/z_loss"] = z / microbatches
            out[f"moe/layer{i}/dropped_frac"] = dropped / slots
            out[f"moe/layer{i}/tokens_per_expert"] = [int(c) for c in counts]
            out["moe/aux_loss"] += aux / microbatches
            out["moe/z_loss"] += z / microbatches
        return out

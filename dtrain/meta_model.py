"""This rank's model on the meta device, shapes only: what `dtrain estimate` and `dtrain.comm_volume`
read instead of building the real one (no process group, no storage).

`ShapeLayers` is dtrain.parallel_layers' set of parts with one tensor rank's shapes and sharding facts
(heads, hidden units and the padded vocabulary split over tp; norms, routers and key/value heads fewer
than tp replicated, with their partial-gradient facts; this rank's E/ep experts). The tests hold what it
builds to the real model's parameters (tests/test_ledger.py) and what the estimates derive from it to
the bytes a real run holds and sends.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from dtrain.config import Config
from dtrain.model import Layers, RMSNorm, Transformer
from dtrain.stage import Stage, balanced_split, n_chunks
from parallel.moe import Experts
from parallel.sharding import Sharding, set_sharding


class ShapeLayers(Layers):
    """dtrain.parallel_layers' parts with one tensor rank's shapes and sharding facts, but no process
    group, built on the meta device: what the gradient buckets and partial sums see."""

    def __init__(self, tp: int, sp: bool, ep: int):
        super().__init__(None)
        self.tp_size, self.sp, self.ep = tp, sp and tp > 1, ep

    def _linear(self, in_features: int, out_features: int, partial: bool = False) -> nn.Linear:
        layer = nn.Linear(in_features, out_features, bias=False)
        set_sharding(layer.weight, Sharding(full_shape=tuple(layer.weight.shape), partial_grad=partial))
        return layer

    def column(self, in_features, out_features):
        return self._linear(in_features, out_features // self.tp_size)

    def row(self, in_features, out_features):
        return self._linear(in_features // self.tp_size, out_features)

    def replicated_column(self, in_features, out_features):
        return self._linear(in_features, out_features, partial=self.tp_size > 1)

    def norm(self, dim, eps):
        layer = RMSNorm(dim, eps)
        set_sharding(layer.weight, Sharding(full_shape=(dim,), partial_grad=self.sp))
        return layer

    def embedding(self, vocab_size, d_model):
        return nn.Embedding(-(-vocab_size // self.tp_size), d_model)  # padded to a multiple of tp

    def head(self, d_model, vocab_size):
        return self._linear(d_model, -(-vocab_size // self.tp_size))

    def moe(self, cfg):
        layer = super().moe(cfg)  # every expert, no groups; then this rank's E/ep of them
        e, tp = cfg.moe.num_experts, self.tp_size
        layer.experts = Experts(e // self.ep, cfg.d_model, layer.experts.w1.shape[1])
        set_sharding(layer.router.weight, Sharding(full_shape=(e, cfg.d_model), partial_grad=tp > 1))
        for w in layer.experts.parameters():
            set_sharding(w, Sharding(tuple(w.shape), partial_grad=tp > 1, expert=True))
        return layer


def meta_chunks(cfg: Config, pp_rank: int) -> dict[int, Transformer]:
    """The chunks pipeline rank `pp_rank` builds (dtrain.stage.Stage), on the meta device, with one tensor
    rank's shapes and this rank's experts."""
    p = cfg.parallel
    total = n_chunks(cfg)
    layers = ShapeLayers(p.tp, p.sp, p.ep)
    chunks = {}
    with torch.device("meta"):
        for c, block_ids in enumerate(balanced_split(cfg.model.n_layers, total)):
            if c % p.pp == pp_rank:
                chunks[c] = Transformer(
                    cfg.model, layers, block_ids=block_ids, has_embedding=c == 0, has_head=c == total - 1
                )
    return chunks


def stage_view(cfg: Config, chunks: dict[int, Transformer]) -> SimpleNamespace:
    """Enough of a Stage for Stage.tied_params and Stage.zero3_units."""
    view = SimpleNamespace(cfg=cfg, chunks=chunks)
    view.tied_params = lambda: Stage.tied_params(view)
    view.zero3_units = lambda: Stage.zero3_units(view)
    return view

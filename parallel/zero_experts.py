"""ZeRO with expert parallelism: one sharded optimizer per reduction group.

A dense parameter is replicated over the whole data-parallel group, so its gradient is summed, and its
moments, (stage 2) gradient and (stage 3) parameter sharded, over dp. An expert parameter is replicated
only over the expert-data-parallel group (the dp/ep ranks holding the same experts; the all-to-all
backward has summed the ep group's tokens into it already), so it is reduced and sharded over edp: ZeRO's
N is dp for dense and dp/ep for expert parameters. Each set has its own wrapper (`split_expert_units`
cuts a stage-3 unit into its dense and its expert part, both gathered around the same forward spans);
this class forwards the trainer's calls to both and joins the gradient norm, whose squares add over
disjoint parameters:

    ||g||^2 = sum_dp(dense shard squares) + sum_ep(sum_edp(expert shard squares))

Under hybrid sharding each wrapper shards over its part of a replica (dp_shard, edp_shard) and sums
its gradient shards over the replica group; replicas hold identical shards, so the sums above run over
the shard groups.

Both wrappers launch their collectives from the same hooks in the same order on every rank, so the
collectives of each group match across its ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from parallel.grad_sync import Held, OptimizerState
from parallel.sharding import sharding_of
from parallel.zero import ZeroDataParallel, model_parallel_norm


def split_expert_units(units: list) -> tuple[list, list]:
    """(parameters, spans) units -> the dense units and the expert units (units without experts drop
    out of the second list)."""
    dense, experts = [], []
    for params, spans in units:
        expert = [p for p in params if sharding_of(p).expert]
        dense.append(([p for p in params if not sharding_of(p).expert], spans))
        if expert:
            experts.append((expert, spans))
    return dense, experts


class ZeroWithExperts:
    """A `parallel.grad_sync.GradSync` of two ZeRO wrappers over disjoint parameters."""

    def __init__(self, dense: ZeroDataParallel, experts: ZeroDataParallel, ep_group: dist.ProcessGroup):
        self.dense, self.experts, self.ep_group = dense, experts, ep_group
        self.parts = (dense, experts)

    def before_backward(self, is_last: bool) -> None:
        for part in self.parts:
            part.before_backward(is_last)

    def finish_grad_sync(self) -> None:
        for part in self.parts:
            part.finish_grad_sync()

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad()

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        for part in self.parts:
            part.scale_grads(factor)

    def grad_norm(self) -> torch.Tensor:
        dense = self.dense
        total = dense.reduced_grad_norm_sq()
        if self.experts.buckets:  # frozen experts (LoRA on attention) have none, on every rank alike
            experts = self.experts.reduced_grad_norm_sq()
            dist.all_reduce(experts, group=self.ep_group)  # each ep rank holds different experts
            total = total + experts
        return model_parallel_norm(total, dense.tp_group, dense.pp_group)

    def step(self, lr: float) -> None:
        for part in self.parts:
            part.step(lr)

    def held_bytes(self) -> Held:
        dense, experts = self.dense.held_bytes(), self.experts.held_bytes()
        return {where: {k: v + experts[where][k] for k, v in kinds.items()} for where, kinds in dense.items()}

    def state_dict(self) -> OptimizerState:
        return {**self.dense.state_dict(), **self.experts.state_dict()}

    def load_state_dict(self, state: OptimizerState) -> None:
        for part in self.parts:
            part.load_state_dict(state)

    def master_weights(self) -> dict:
        return {**self.dense.master_weights(), **self.experts.master_weights()}

    @contextlib.contextmanager
    def params_whole(self):
        with self.dense.params_whole(), self.experts.params_whole():
            yield

"""ZeRO stages 1-2 with expert parallelism: one sharded optimizer per reduction group.

A dense parameter is replicated over the whole data-parallel group, so its gradient is summed, and its
moments and (stage 2) gradient sharded, over dp. An expert parameter is replicated only over the
expert-data-parallel group (the dp/ep ranks holding the same experts; the all-to-all backward has summed
the ep group's tokens into it already), so it is reduced and sharded over edp: ZeRO's N is dp for dense
and dp/ep for expert parameters. Each set is a `ZeroDataParallel`; this class forwards the trainer's calls
to both and joins the gradient norm, whose squares add over disjoint parameters:

    ||g||^2 = sum_dp(dense shard squares) + sum_ep(sum_edp(expert shard squares))

Both wrappers launch their reduce-scatters from the same gradient hooks in the same order on every rank,
so the collectives of each group match across its ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.sharding import sharding_of
from parallel.zero import AdamWConfig, ZeroDataParallel


class ZeroWithExperts:
    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        dp_group: dist.ProcessGroup,
        edp_group: dist.ProcessGroup,
        ep_group: dist.ProcessGroup,
        stage: int,
        bucket_mb: float,
        adamw: AdamWConfig,
        offload: bool = False,
    ):
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage {stage} with expert parallelism is not implemented; use 1 or 2")
        dense = [p for p in params if not sharding_of(p).expert]
        experts = [p for p in params if sharding_of(p).expert]
        self.dense = ZeroDataParallel(dense, dp_group, stage, bucket_mb, adamw, offload)
        self.experts = ZeroDataParallel(experts, edp_group, stage, bucket_mb, adamw, offload)
        self.parts = (self.dense, self.experts)
        self.ep_group = ep_group

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

    def reduced_grad_norm_sq(self) -> torch.Tensor:
        experts = self.experts.reduced_grad_norm_sq()
        dist.all_reduce(experts, group=self.ep_group)  # each ep rank holds different experts
        return self.dense.reduced_grad_norm_sq() + experts

    def step(self, lr: float) -> None:
        for part in self.parts:
            part.step(lr)

    def held_bytes(self) -> dict[str, dict[str, int]]:
        dense, experts = self.dense.held_bytes(), self.experts.held_bytes()
        return {where: {k: v + experts[where][k] for k, v in kinds.items()} for where, kinds in dense.items()}

    def full_state(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        return {**self.dense.full_state(), **self.experts.full_state()}

    def load_full_state(self, state: dict[nn.Parameter, dict[str, torch.Tensor]]) -> None:
        for part in self.parts:
            part.load_full_state(state)

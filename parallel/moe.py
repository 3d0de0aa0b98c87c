"""Mixture-of-experts feed-forward layer (Switch / GShard / ST-MoE routing) with expert parallelism.

For the T tokens of one micro-batch of one data-parallel rank (x_t in R^d):

  logits = x W_r^T                  (E router outputs, computed in fp32 whatever the compute precision)
  p      = softmax(logits)           top-k experts per token, gate weights w = p_topk / sum(p_topk)
  C      = floor(capacity_factor * T * k / E)           slots per expert (`expert_capacity`)
  y_t    = sum over kept choices j of w_tj * Expert_{e_tj}(x_t)          (a dropped choice adds 0; the
                                                                         residual carries the token)
  aux    = E * sum_e f_e * m_e       f_e = share of the T*k routed slots that chose e (before dropping),
                                     m_e = mean over tokens of p_e               (load balancing)
  z      = mean_t logsumexp(logits_t)^2                                          (router z-loss)

Slots are served in a fixed priority: every first choice before any second choice, and within a choice
rank by sequence position, then batch row. A slot beyond its expert's capacity is dropped. The order is
sequence-major so that tokens split over the tensor group (contiguous sequence chunks) are a contiguous
range of it: each tensor rank only needs the per-expert counts of the ranks before it (one all-gather of
k*E integers) to place its slots, and the dropped set is the same whatever the layout.

Context parallelism: a cp rank holds two load-balanced chunks of each sequence (parallel.context_parallel),
each possibly cut again over tp, so a rank's tokens are up to two runs of the priority order rather than
one. `ContextRouting` counts the slots of each run, gathers those counts over tp and then over cp (2*k*E
integers per rank), and places a run behind every run of any rank that starts earlier in the sequence:
the dropped set is again the one the whole micro-batch on one rank would drop. aux and z are each rank's
share as under tp; router gradients are summed over dp x cp with the dense ones, expert gradients over
edp x cp.

Tensor parallelism: experts are *not* split. Each tensor rank routes and runs its own sequence chunk of
the micro-batch with whole experts (under sequence parallelism the chunk is already local; without it,
the layer splits its replicated input and all-gathers its output). Router and expert gradients are
therefore partial over the tensor group (`partial_grad`), and aux/z below are each rank's share of the
sums. Expert parallelism: `parallel.expert_parallel.run_experts` over the ep group.

Auxiliary losses enter the objective as coef * loss * T / (global batch tokens), like the token losses,
so accumulation and pipelining do not change them. They are not returned through the model: the layer
output carries a hook (`_SeedAuxGrad`) that starts their backward with that scale when the output's
gradient arrives, which works on any pipeline stage (Megatron's MoEAuxLossAutoScaler does the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import all_gather_flat, gather_to_replica, scatter_to_sp
from parallel.context_parallel import token_segments
from parallel.expert_parallel import run_experts
from parallel.grid import group_rank, group_size
from parallel.precision import wide
from parallel.sharding import Sharding, set_sharding


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    return math.floor(capacity_factor * tokens * top_k / num_experts)


@dataclass
class Routing:
    expert: torch.Tensor  # (T, k) chosen experts
    weight: torch.Tensor  # (T, k) gate weights renormalised over the k choices (differentiable)
    keep: torch.Tensor  # (T, k) the slot fits its expert's capacity
    counts: torch.Tensor  # (E,) slots of these tokens routed to each expert, before dropping
    aux_loss: torch.Tensor  # this rank's share of the load-balancing loss (sums over tensor ranks)
    z_loss: torch.Tensor  # this rank's share of the z-loss


@dataclass
class ContextRouting:
    """Where this rank's tokens lie in the priority order under context parallelism: `segment` (T_local,)
    says which of its two runs each token is in; `starts` holds every rank's two run starts in the
    gathered order (cp rank, tp rank, run) (parallel.context_parallel.token_segments)."""

    segment: torch.Tensor
    starts: torch.Tensor
    mine: int  # index in `starts` of this rank's first run
    tp_group: object
    cp_group: object

    def earlier_and_total(self, one_hot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, the (k, E) slots of other ranks' runs earlier in the sequence; and all slots."""
        k, e = one_hot.shape[1:]
        runs = one_hot.new_zeros((2, k, e)).index_add_(0, self.segment, one_hot)
        for group in (self.tp_group, self.cp_group):  # gathered along dim 0: tp ranks, then cp ranks
            n = group_size(group)
            if n > 1:
                gathered = runs.new_empty((n * runs.shape[0], k, e))
                all_gather_flat(gathered, runs.contiguous(), group=group)
                runs = gathered
        mine = self.starts[self.mine : self.mine + 2]
        before = self.starts.unsqueeze(0) < mine.unsqueeze(1)  # (2, all runs)
        before[:, self.mine : self.mine + 2] = False  # this rank's own runs: counted by the local cumsum
        earlier = (before.to(runs.dtype)[:, :, None, None] * runs.unsqueeze(0)).sum(1)  # (2, k, E)
        return earlier[self.segment], runs.sum(0)


def route(
    logits: torch.Tensor,
    top_k: int,
    capacity: int,
    total_tokens: int,
    tp_group=None,
    context: ContextRouting | None = None,
) -> Routing:
    """Routing of this rank's tokens, given in priority order (T_local, E). `total_tokens` is T, the
    tokens of the whole micro-batch; under tensor parallelism this rank holds the tp_rank-th contiguous
    part of them (in priority order) and the others are counted through one all-gather over tp_group;
    under context parallelism `context` places this rank's runs among every rank's."""
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    top_p, expert = probs.topk(top_k, dim=-1)
    weight = top_p / top_p.sum(dim=-1, keepdim=True)
    one_hot = F.one_hot(expert, num_experts)  # (T_local, k, E)
    local_counts = one_hot.sum(0)  # (k, E)
    tp = group_size(tp_group)
    if context is not None:
        earlier_ranks, total = context.earlier_and_total(one_hot)
    elif tp > 1:
        all_counts = local_counts.new_empty((tp * top_k, num_experts))  # gathered along dim 0
        all_gather_flat(all_counts, local_counts, group=tp_group)
        all_counts = all_counts.view(tp, top_k, num_experts)
        earlier_ranks = all_counts[: dist.get_rank(tp_group)].sum(0)
        total = all_counts.sum(0)
    else:
        earlier_ranks, total = torch.zeros_like(local_counts), local_counts
    # Queue position of slot (t, j) at expert e: all slots of earlier choice ranks for e, plus slots of
    # choice rank j for e on earlier tensor ranks, plus earlier local tokens with choice j = e.
    offset = (total.cumsum(0) - total) + earlier_ranks  # (k, E), or (T_local, k, E) with context
    position = offset + one_hot.cumsum(0) - one_hot  # (T_local, k, E)
    position = position.gather(-1, expert.unsqueeze(-1)).squeeze(-1)
    routed_share = total.sum(0).to(probs.dtype) / (total_tokens * top_k)  # f_e, no gradient
    return Routing(
        expert=expert,
        weight=weight,
        keep=position < capacity,
        counts=local_counts.sum(0),
        aux_loss=num_experts * (routed_share * probs.sum(0)).sum() / total_tokens,
        z_loss=torch.logsumexp(logits, dim=-1).pow(2).sum() / total_tokens,
    )


class Experts(nn.Module):
    """This rank's SwiGLU experts, weights stacked over experts: w1 (gate), w3 (up): (E_local, d_ff, d);
    w2 (down): (E_local, d, d_ff). The canonical tensors hold all E experts along dim 0, split over ep."""

    def __init__(self, num_local: int, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_local, d_model, d_ff))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # Every local expert runs, on zero rows if it got none, so every weight takes part in the graph.
        out = []
        for e, rows in enumerate(x.split(counts)):
            out.append(F.linear(F.silu(F.linear(rows, self.w1[e])) * F.linear(rows, self.w3[e]), self.w2[e]))
        return torch.cat(out)


class _SeedAuxGrad(torch.autograd.Function):
    """Identity on the layer output; its backward also returns d(objective)/d(aux) = `scale` for the
    auxiliary loss, so the aux loss backpropagates exactly once, when the output's gradient arrives."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class MoELayer(nn.Module):
    """The MoE feed-forward block; replaces the dense MLP. Input and output: (batch, seq, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float,
        aux_loss_coef: float,
        z_loss_coef: float,
        *,
        ep_group=None,
        tp_group=None,
        split_tokens: bool = False,
        cp_group=None,
    ):
        super().__init__()
        ep, tp = group_size(ep_group), group_size(tp_group)
        if num_experts % ep:
            raise ValueError(f"parallel.ep={ep} must divide model.moe.num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.ep_group, self.tp_group, self.split_tokens = ep_group, tp_group, split_tokens and tp > 1
        self.cp_group = cp_group if group_size(cp_group) > 1 else None
        self.aux_grad_scale = 0.0  # d(objective)/d(aux) per micro-batch: set by the training loop
        self.router = nn.Linear(d_model, num_experts, bias=False)
        set_sharding(self.router.weight, Sharding(full_shape=(num_experts, d_model), partial_grad=tp > 1))
        self.experts = Experts(num_experts // ep, d_model, d_ff)
        ep_rank = group_rank(ep_group)
        for w in self.experts.parameters():
            full = (num_experts, *w.shape[1:])
            set_sharding(
                w,
                Sharding(full, 0, ep, ep_rank, group="ep", partial_grad=tp > 1, expert=True),
            )
        # Per training step, summed over this rank's micro-batches: aux share, z share, dropped slots,
        # slots routed to each expert (read and reset by `take_stats`).
        self.register_buffer("stats", torch.zeros(3 + num_experts, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_tokens:  # replicated input: each tensor rank takes its sequence chunk
            x = scatter_to_sp(x, self.tp_group)
        b, s, d = x.shape
        tokens = x.transpose(0, 1).reshape(s * b, d)  # sequence-major: the routing priority order
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(wide(tokens), wide(self.router.weight))
        total_tokens = b * s * group_size(self.tp_group) * group_size(self.cp_group)
        capacity = expert_capacity(self.capacity_factor, total_tokens, self.top_k, self.num_experts)
        context = self._context_routing(b, s, x.device) if self.cp_group is not None else None
        r = route(logits, self.top_k, capacity, total_tokens, self.tp_group, context)
        slot = r.keep.flatten().nonzero().squeeze(-1)  # kept slots in (token, choice) order
        token = slot // self.top_k
        y = run_experts(
            tokens.index_select(0, token),
            r.expert.flatten()[slot],
            self.num_experts,
            self.experts,
            self.ep_group,
        )
        weighted = (y * r.weight.flatten()[slot].unsqueeze(-1)).to(x.dtype)
        out = torch.zeros_like(tokens).index_add(0, token, weighted)
        if torch.is_grad_enabled():
            aux = self.aux_loss_coef * r.aux_loss + self.z_loss_coef * r.z_loss
            out = _SeedAuxGrad.apply(out, aux, self.aux_grad_scale)
            if torch._C._current_graph_task_id() == -1:  # not an activation-checkpointing recompute
                self._record(r)
        out = out.view(s, b, d).transpose(0, 1)
        return gather_to_replica(out, self.tp_group) if self.split_tokens else out

    def _context_routing(self, b: int, s: int, device) -> ContextRouting:
        tp, cp = group_size(self.tp_group), group_size(self.cp_group)
        seq_len = s * tp * cp
        runs = [
            token_segments(seq_len, cp, c, tp, t) for c in range(cp) for t in range(tp)
        ]  # the gathered order: tp ranks within cp ranks
        starts = torch.tensor([start for rank in runs for start, _ in rank], device=device)
        me = group_rank(self.cp_group) * tp + group_rank(self.tp_group)
        first_run = runs[me][0][1]
        # Tokens are sequence-major: token i is at local sequence index i // b.
        segment = (torch.arange(s * b, device=device) // b >= first_run).long()
        return ContextRouting(segment, starts, 2 * me, self.tp_group, self.cp_group)

    @torch.no_grad()
    def _record(self, r: Routing) -> None:
        dropped = (~r.keep).sum()
        values = torch.stack([r.aux_loss.detach(), r.z_loss.detach(), dropped.to(r.aux_loss.dtype)])
        self.stats[:3] += values.to(self.stats)
        self.stats[3:] += r.counts.to(self.stats)

    def take_stats(self) -> torch.Tensor:
        """This rank's step statistics [aux share, z share, dropped slots, slots per expert], then reset."""
        stats = self.stats.clone()
        self.stats.zero_()
        return stats


def moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def set_aux_grad_scale(layers, scale: float) -> None:
    """d(objective)/d(aux loss of one micro-batch) for these MoE layers: the micro-batch's target tokens /
    the global batch's, times the fp16 loss scale (and times dp under torch DDP, which averages
    gradients), so auxiliary losses weigh like token losses."""
    for layer in layers:
        layer.aux_grad_scale = scale


def aux_grad_scales(microbatches, global_targets: int, scale: float = 1.0) -> list[float]:
    """set_aux_grad_scale's value for each (inputs, targets, ...) micro-batch; targets < 0 are ignored."""
    return [scale * int((mb[1] >= 0).sum()) / global_targets for mb in microbatches]

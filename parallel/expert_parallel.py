"""Expert parallelism: send every routed token row to the rank that holds its expert, run the experts
there, and bring the results back in the original order.

E experts are spread evenly over the `ep` ranks of an expert-parallel group: group rank r holds experts
[r * E/ep, (r + 1) * E/ep). For one MoE layer, with n kept (token, expert) rows on this rank:

  1. sort the rows by expert (stable): the rows for rank r's experts form one contiguous run;
  2. exchange per-expert counts, all_to_all_single of E integers: afterwards every rank knows how many
     rows it receives from each peer for each of its own experts (the uneven split sizes of step 3);
  3. dispatch, all_to_all_single of the rows with those uneven splits: each row goes only to the rank
     owning its expert (rows for local experts stay);
  4. the received rows arrive grouped by (source rank, local expert); regroup them by (local expert,
     source rank) so each expert runs once on one contiguous batch, run the experts, undo the regroup;
  5. combine, the reverse all_to_all_single (split lists swapped) returns each result to its row's rank,
     where undoing the sort of step 1 restores the original row order.

The autograd adjoint of an all-to-all is the all-to-all with the send and receive splits swapped, so the
backward pass repeats steps 5 and 3 in reverse on the gradients. Bytes sent by one all-to-all: the rows
leaving this rank times d times the element size; with balanced routing (ep-1)/ep of the routed rows
(docs/formulas.md, "MoE dispatch + combine"). An ep group of one (or no group) skips every collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel.grid import group_size


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """fwd: rows[send splits] -> peers, rows[recv splits] <- peers;  bwd: the same with splits swapped."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_to_all(dy, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Autograd-aware all_to_all_single over dim 0 with uneven splits (send[r] rows to rank r)."""
    return _AllToAll.apply(x, send, recv, group)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def run_experts(
    rows: torch.Tensor,
    expert_of_row: torch.Tensor,
    num_experts: int,
    experts: Callable[[torch.Tensor, list[int]], torch.Tensor],
    group=None,
) -> torch.Tensor:
    """experts applied to each row by the rank holding its expert; returns the outputs row for row.

    rows: (n, d); expert_of_row: (n,) global expert ids; experts(x, counts) runs this rank's E/ep
    experts on x grouped by local expert, counts[j] rows for local expert j, and returns (sum(counts), d).
    Collective over `group` (the expert-parallel group): every rank calls it for every MoE layer.
    """
    ep = group_size(group)
    local = num_experts // ep
    order = torch.argsort(expert_of_row, stable=True)
    send_counts = torch.bincount(expert_of_row, minlength=num_experts)  # (E,) = (ep, local) row-major
    by_expert = rows.index_select(0, order)
    if ep == 1:
        out = experts(by_expert, send_counts.tolist())
    else:
        recv_counts = torch.empty_like(send_counts)  # (ep, local): from source s, for local expert j
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send = send_counts.view(ep, local).sum(1).tolist()
        recv_matrix = recv_counts.view(ep, local)
        recv = recv_matrix.sum(1).tolist()
        received = all_to_all(by_expert, send, recv, group)
        # Each received row's block key is j * ep + s; a stable sort by it regroups (s, j) -> (j, s).
        s = torch.arange(ep, device=rows.device).view(ep, 1)
        j = torch.arange(local, device=rows.device).view(1, local)
        block_key = (j * ep + s).flatten()
        regroup = torch.argsort(torch.repeat_interleave(block_key, recv_matrix.flatten()), stable=True)
        y = experts(received.index_select(0, regroup), recv_matrix.sum(0).tolist())
        out = all_to_all(y.index_select(0, inverse_permutation(regroup)), recv, send, group)
    return out.index_select(0, inverse_permutation(order))

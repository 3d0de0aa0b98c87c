"""All-gather and reduce-scatter over Gloo as direct point-to-point exchanges.

Over n ranks each rank sends its part of the collective straight to every other rank (n - 1 sends of S/n
bytes, S the full size) and receives theirs: the same bytes per rank as the ring, (n - 1)/n * S, and the
same result. Gloo's own are slower on CPU, by copies rather than bytes: its all-gather stages the input
and the output in fresh flat buffers and copies out, and it has no reduce-scatter, only an all-reduce of
each rank's part (`python -m dtrain.bench.collectives`: 32 MiB on 2 ranks, exchange against Gloo's
all-gather and reduce-scatter in the figures of docs/benchmarks.md). NCCL keeps its own collectives.

The communication ledger counts an exchange as the collective it stands for: every send carries that
collective's tag, and the opening send (to the next rank of the group, the one every exchange has) is
counted as one call of the whole collective's ring bytes (parallel.ledger.exchange_share).

A reduce-scatter sums the n parts in rank order, the same order on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.ledger import ALL_GATHER, REDUCE_SCATTER, exchange_tag


class Exchange:
    """The pending sends and receives of one exchange, completed by `wait()` (a c10d Work's use)."""

    def __init__(self, works: list, finish=None):
        self.works, self.finish = works, finish

    def wait(self, timeout=None) -> bool:
        for work in self.works:
            work.wait()
        self.works = []
        if self.finish is not None:
            self.finish, finish = None, self.finish
            finish()
        return True


def _post(op: str, group, sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor]) -> list:
    """isend sends[p] to group rank p and irecv receives[p] from it, tagged as part of `op`: this rank
    opens with its send to the next rank, and each receive expects the tag its sender used."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)

    def tag(sender: int, receiver: int) -> int:
        return exchange_tag(op, opens=receiver == (sender + 1) % n)

    works = [dist.isend(t, group=group, group_dst=p, tag=tag(rank, p)) for p, t in sends.items()]
    works += [dist.irecv(t, group=group, group_src=p, tag=tag(p, rank)) for p, t in receives.items()]
    return works


def _returned(work: Exchange, async_op: bool) -> Exchange | None:
    """As torch.distributed's collectives: the work to wait for with async_op, else done and None."""
    if async_op:
        return work
    work.wait()
    return None


def all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    """output = cat_r input_r over `group` (input may be this rank's chunk of output, in place)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = output.chunk(n)
    if parts[rank].data_ptr() != input.data_ptr():
        parts[rank].copy_(input)
    peers = [p for p in range(n) if p != rank]
    work = Exchange(_post(ALL_GATHER, group, dict.fromkeys(peers, input), {p: parts[p] for p in peers}))
    return _returned(work, async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    """output = [sum_r input_r]_rank over `group`, summed in rank order (output may be this rank's chunk
    of input, in place)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = input.chunk(n)
    peers = [p for p in range(n) if p != rank]
    received = {p: torch.empty_like(output) for p in peers}

    def finish() -> None:
        terms = [parts[rank] if p == rank else received[p] for p in range(n)]
        if rank >= 2 and output.data_ptr() == parts[rank].data_ptr():
            terms[rank] = parts[rank].clone()  # output is overwritten by the first two terms' sum
        torch.add(terms[0], terms[1], out=output)
        for term in terms[2:]:
            output.add_(term)

    work = Exchange(_post(REDUCE_SCATTER, group, {p: parts[p] for p in peers}, received), finish)
    return _returned(work, async_op)

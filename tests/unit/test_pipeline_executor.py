"""parallel.pipeline.PipelineExecutor on its own: a stack of plain torch layers cut into pp * v chunks,
run by every schedule over real point-to-point sends between Gloo ranks, must give the token-loss sum
and every chunk's gradients of one process running the whole stack on the whole batch (float64, to
1e-12 relative: the reference reduces the whole batch in one matmul where the pipeline accumulates
micro-batch gradients one by one, which only reorders the rounding). Each chunk's last backward sends its
input gradient before its weights have their gradients, and after them with input_grad_first off."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import pipeline_schedules as ps
from parallel.grid import group_size
from parallel.pipeline import PipelineExecutor
from tests import harness

WIDTH, ROWS, MICRO = 5, 8, 2


class Chunk(nn.Module):
    """A slice of the stack; the last one also takes the targets and returns the loss sum."""

    def __init__(self, layers: list[nn.Module], last: bool):
        super().__init__()
        self.layers, self.last = nn.Sequential(*layers), last

    def forward(self, x, targets=None):
        out = self.layers(x)
        return ((out - targets) ** 2).sum() if self.last else out


def stack(n_chunks: int) -> list[Chunk]:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(n_chunks)]
    return [Chunk([layer], last=c == n_chunks - 1) for c, layer in enumerate(layers)]


def executor_case(schedule: str, v: int, input_grad_first: bool = True) -> list[str]:
    torch.set_default_dtype(torch.float64)
    try:
        pp = dist.get_world_size()
        group = harness.grid(pp=pp, dp=1).pp_group
        n = pp * v
        m = ROWS // MICRO
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(ROWS, WIDTH, generator=g), torch.randn(ROWS, WIDTH, generator=g)
        microbatches = [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, ROWS, MICRO)]
        whole = stack(n)  # the reference: every chunk in one process, the whole batch at once
        h = x
        for chunk in whole[:-1]:
            h = chunk(h)
        expected_loss = whole[-1](h, y)
        expected_loss.backward()
        rank = dist.get_rank()
        mine = {c: chunk for c, chunk in enumerate(stack(n)) if c % pp == rank}
        executor = PipelineExecutor(
            mine, n, group, lambda rows: (rows, WIDTH), torch.float64, torch.device("cpu"), input_grad_first
        )
        # The order of input-gradient sends and weight-gradient accumulations on this rank.
        events, send = [], executor._send
        executor._send = lambda t, to, direction, tag, mb: (
            events.append((direction, tag)) or send(t, to, direction, tag, mb)
        )
        for c, chunk in mine.items():
            for p in chunk.parameters():
                p.register_post_accumulate_grad_hook(lambda p, c=c: events.append(("grad", c)))
        actions = ps.build(schedule, pp, m, v)[rank]
        finals = []
        loss = executor.run(
            actions, microbatches, before_backward=lambda c, is_last: finals.append((c, is_last))
        )
        problems = []
        if (n - 1) in mine and not torch.allclose(loss, expected_loss, rtol=1e-12, atol=0):
            problems.append(f"loss {float(loss)} != {float(expected_loss)}")
        for c, chunk in mine.items():
            for (name, p), q in zip(chunk.named_parameters(), whole[c].parameters(), strict=True):
                if not torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-15):
                    problems.append(f"chunk {c} {name}: gradient differs")
            if sum(1 for k, last in finals if k == c and last) != 1:
                problems.append(f"chunk {c}: the last backward was not announced exactly once")
            if c > 0:  # a chunk's last backward sends dX before its weights' gradients when split
                sent = max(i for i, e in enumerate(events) if e == (1, c - 1))
                weights_after = max(i for i, e in enumerate(events) if e == ("grad", c)) > sent
                if weights_after != input_grad_first:
                    problems.append(
                        f"chunk {c}: the last input gradient was sent at event {sent} of {events}"
                    )
        assert group_size(group) == pp
        return problems
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(("schedule", "v"), [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_every_schedule_gives_the_whole_batch_gradients(world2, schedule, v):
    assert world2.run(executor_case, schedule, v) == [[], []]


def test_a_single_backward_everywhere_gives_the_same_gradients(world2):
    assert world2.run(executor_case, "1f1b", 1, False) == [[], []]

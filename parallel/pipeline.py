"""The pipeline executor: runs a schedule (parallel.pipeline_schedules) over this rank's model chunks.

Chunk c lives on pipeline rank c % pp. A forward F(c, i) takes micro-batch i's tokens (c = 0) or receives
the activation of F(c-1, i) from the previous rank, runs chunk c, and sends its output on (or, on the last
chunk, keeps the token-loss sum). A backward B(c, i) backpropagates the loss (last chunk) or the gradient
received from B(c+1, i), and sends the input's gradient back. Sends are posted with batch_isend_irecv
and never waited on until the end of the step, so a send can never block a rank: with the schedules'
dependency order (checked by pipeline_schedules.simulate) every receive is eventually matched and the
step cannot deadlock. Every request is waited on before the step returns.

Messages are tagged by (direction, chunk, micro-batch), so matching never depends on arrival order.

A micro-batch is (inputs, targets) or (inputs, targets, context): context is a dict of tensors that
every chunk's forward receives as keyword arguments (per-token positions and document ids of packed
sequences, say), since each chunk needs them and only hidden states cross a stage boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.grid import group_ranks, group_size
from parallel.pipeline_schedules import Action


class PipelineExecutor:
    def __init__(
        self,
        chunks: dict[int, nn.Module],
        n_chunks: int,
        group: dist.ProcessGroup,
        activation_shape: Callable[[int], tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
    ):
        """chunks: this rank's chunk index -> module. activation_shape(micro_batch_rows) gives the shape
        of a hidden state crossing a stage boundary (the sequence is local under sequence parallelism)."""
        self.chunks, self.n_chunks, self.group = chunks, n_chunks, group
        self.pp = group_size(group)
        self.group_ranks = group_ranks(group)
        self.activation_shape, self.dtype, self.device = activation_shape, dtype, device

    def _peer(self, chunk: int) -> int:
        return self.group_ranks[chunk % self.pp]  # global rank holding `chunk`

    def _tag(self, direction: int, chunk: int, microbatch: int) -> int:
        return (direction * self.n_chunks + chunk) * 100_000 + microbatch

    def _recv(self, chunk_from: int, direction: int, chunk_tag: int, mb: int, rows: int) -> torch.Tensor:
        buffer = torch.empty(self.activation_shape(rows), dtype=self.dtype, device=self.device)
        op = dist.P2POp(
            dist.irecv, buffer, self._peer(chunk_from), self.group, self._tag(direction, chunk_tag, mb)
        )
        for work in dist.batch_isend_irecv([op]):
            work.wait()
        return buffer

    def _send(self, tensor: torch.Tensor, chunk_to: int, direction: int, chunk_tag: int, mb: int) -> None:
        tensor = tensor.contiguous()  # sequence-parallel outputs come out of a movedim
        op = dist.P2POp(
            dist.isend, tensor, self._peer(chunk_to), self.group, self._tag(direction, chunk_tag, mb)
        )
        self.pending_sends += dist.batch_isend_irecv([op])

    def run(
        self,
        actions: Sequence[Action],
        microbatches: Sequence[tuple],
        loss_scale: float = 1.0,
        before_backward: Callable[[int, bool], None] | None = None,
        before_compute: Callable[[int], None] | None = None,
        record: list | None = None,
    ) -> torch.Tensor:
        """Run `actions` (forwards only for evaluation); returns the sum of token losses of the micro-
        batches whose last chunk ran here (zero elsewhere). `before_backward(chunk, is_last)` is called
        before each backward, with is_last true for the chunk's final backward of this step (where a
        data-parallel wrapper should start reducing its gradients). `before_compute(microbatch)` is called
        before each forward and backward (a backward may recompute the forward under activation
        checkpointing), for state that differs per micro-batch. With a `record` list, each action appends
        `(action, start, end)`, time.perf_counter() around its compute only (the chunk call of a forward,
        the backward call of a backward; receives and sends are outside), for dtrain.analysis.timeline."""
        self.pending_sends: list = []
        last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind == "B"}
        stored: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        # Activations travel in the parameters' dtype; token-loss sums are fp32 at least (the loss is).
        loss_dtype = torch.promote_types(self.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=loss_dtype, device=self.device)
        for i, a in enumerate(actions):
            inputs, targets, *context = microbatches[a.microbatch]
            rows = inputs.shape[0]
            if before_compute is not None:
                before_compute(a.microbatch)
            if a.kind == "F":
                kwargs = {k: v.to(self.device) for k, v in context[0].items()} if context else {}
                if a.chunk == 0:
                    x_in, x = None, inputs.to(self.device)
                else:
                    x_in = self._recv(a.chunk - 1, 0, a.chunk, a.microbatch, rows)
                    x = x_in.requires_grad_(torch.is_grad_enabled())
                last = a.chunk == self.n_chunks - 1
                start = time.perf_counter() if record is not None else 0.0
                out = self.chunks[a.chunk](x, targets.to(self.device) if last else None, **kwargs)
                if record is not None:
                    record.append((a, start, time.perf_counter()))
                if last:
                    loss_sum += out.detach().to(loss_dtype)
                else:
                    self._send(out.detach(), a.chunk + 1, 0, a.chunk + 1, a.microbatch)
                if torch.is_grad_enabled():
                    stored[(a.chunk, a.microbatch)] = (x_in, out)
            else:
                x_in, out = stored.pop((a.chunk, a.microbatch))
                if before_backward is not None:
                    before_backward(a.chunk, last_backward[a.chunk] == i)
                if a.chunk == self.n_chunks - 1:
                    start = time.perf_counter() if record is not None else 0.0
                    (out * loss_scale).backward()
                else:
                    grad = self._recv(a.chunk + 1, 1, a.chunk, a.microbatch, rows)
                    start = time.perf_counter() if record is not None else 0.0
                    torch.autograd.backward(out, grad)
                if record is not None:
                    record.append((a, start, time.perf_counter()))
                if x_in is not None:
                    self._send(x_in.grad, a.chunk - 1, 1, a.chunk - 1, a.microbatch)
        for work in self.pending_sends:
            work.wait()
        self.pending_sends = []
        return loss_sum

"""The pipeline executor: runs a schedule (parallel.pipeline_schedules) over this rank's model chunks.

Chunk c lives on pipeline rank c % pp. A forward F(c, i) takes micro-batch i's tokens (c = 0) or receives
the activation of F(c-1, i) from the previous rank, runs chunk c, and sends its output on (or, on the last
chunk, keeps the token-loss sum). A backward B(c, i) backpropagates the loss (last chunk) or the gradient
received from B(c+1, i), and sends the input's gradient back. Sends are posted with batch_isend_irecv
and never waited on until the end of the step, so a send can never block a rank: with the schedules'
dependency order (checked by pipeline_schedules.simulate) every receive is eventually matched and the
step cannot deadlock. Every request is waited on before the step returns.

Messages are tagged by (direction, chunk, micro-batch), so matching never depends on arrival order.

A chunk's last backward of the step is where the drain waits: B(c-1, i) can start only once B(c, i) has
sent dX, and nothing else is left to overlap with. That backward runs input-gradient first
(parallel.split_backward): dX is computed and sent, then the weights' gradients while the previous stage
already backpropagates. Earlier backwards run whole: there the receiver has other work, and the split
costs the sender more than it saves.

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
from parallel.split_backward import backward_input_first


class PipelineExecutor:
    def __init__(
        self,
        chunks: dict[int, nn.Module],
        n_chunks: int,
        group: dist.ProcessGroup,
        activation_shape: Callable[[int], tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        input_grad_first: bool = True,
    ):
        """chunks: this rank's chunk index -> module. activation_shape(micro_batch_rows) gives the shape
        of a hidden state crossing a stage boundary (the sequence is local under sequence parallelism).
        input_grad_first: a chunk's last backward computes and sends dX before the weights' gradients
        (parallel.split_backward); off where the graph must not stay alive between the two passes."""
        self.chunks, self.n_chunks, self.group = chunks, n_chunks, group
        self.input_grad_first = input_grad_first
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

    def _forward(self, a: Action, inputs, x_in, targets, context: dict, stored: dict, record) -> torch.Tensor:
        """F(a) on the tokens (first chunk) or the received `x_in`; sends the output on, or returns the
        token-loss sum on the last chunk. The graph is kept in `stored` alone: no local of run() outlives
        the micro-batch's backward (which retains the graph while its weight pass is pending)."""
        kwargs = {k: v.to(self.device) for k, v in context.items()}
        x = inputs.to(self.device) if x_in is None else x_in.requires_grad_(torch.is_grad_enabled())
        last = a.chunk == self.n_chunks - 1
        start = time.perf_counter() if record is not None else 0.0
        out = self.chunks[a.chunk](x, targets.to(self.device) if last else None, **kwargs)
        if record is not None:
            record.append((a, start, time.perf_counter()))
        if not last:
            self._send(out.detach(), a.chunk + 1, 0, a.chunk + 1, a.microbatch)
        if torch.is_grad_enabled():
            stored[(a.chunk, a.microbatch)] = (x_in, out)
        return out.detach() if last else None

    def _backward(self, a: Action, x_in, out, grad, loss_scale: float, split: bool) -> None:
        """B(a): backpropagate `grad` (the loss scale on the last chunk) from `out` and send the input's
        gradient back. A method so that the micro-batch's graph dies with its frame on return."""
        if a.chunk == self.n_chunks - 1:
            out = out * loss_scale  # the loss: its gradient is the scale
        if x_in is not None and split:
            # The previous stage waits on dX alone: send it after the dX half of the backward, then run the
            # dW half while that stage already backpropagates (zero-bubble's B / W split, in place).
            weight_pass = backward_input_first(out, grad, x_in, self.chunks[a.chunk].parameters())
            self._send(x_in.grad, a.chunk - 1, 1, a.chunk - 1, a.microbatch)
            weight_pass()
            return
        torch.autograd.backward(out, grad)
        if x_in is not None:
            self._send(x_in.grad, a.chunk - 1, 1, a.chunk - 1, a.microbatch)

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
        both passes of a backward; receives are outside, and so are sends but the input gradient's,
        posted between a backward's passes), for dtrain.analysis.timeline."""
        self.pending_sends: list = []
        last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind == "B"}
        stored: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        # Activations travel in the parameters' dtype; token-loss sums are fp32 at least (the loss is).
        loss_dtype = torch.promote_types(self.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=loss_dtype, device=self.device)
        for i, a in enumerate(actions):
            inputs, targets, *extra = microbatches[a.microbatch]
            rows = inputs.shape[0]
            if before_compute is not None:
                before_compute(a.microbatch)
            if a.kind == "F":
                x_in = None if a.chunk == 0 else self._recv(a.chunk - 1, 0, a.chunk, a.microbatch, rows)
                context = extra[0] if extra else {}
                loss = self._forward(a, inputs, x_in, targets, context, stored, record)
                if loss is not None:
                    loss_sum += loss.to(loss_dtype)
            else:
                is_last = last_backward[a.chunk] == i
                if before_backward is not None:
                    before_backward(a.chunk, is_last)
                grad = None
                if a.chunk != self.n_chunks - 1:
                    grad = self._recv(a.chunk + 1, 1, a.chunk, a.microbatch, rows)
                split = self.input_grad_first and is_last
                start = time.perf_counter() if record is not None else 0.0
                self._backward(a, *stored.pop((a.chunk, a.microbatch)), grad, loss_scale, split)
                if record is not None:
                    record.append((a, start, time.perf_counter()))
        for work in self.pending_sends:
            work.wait()
        self.pending_sends = []
        return loss_sum

"""Backward in two passes, the input's gradient first and the weights' after: the B / W split of zero-
bubble pipeline schedules (Qi et al. 2023). A pipeline stage whose previous stage waits on its input's
gradient can send that gradient after the first pass, the dX half of every matmul's backward, and compute
the dW half while the previous stage already runs its own backward. Each node still runs its formulas
once in all: the first pass computes only the outputs that lead to the input, the second only those that
lead to the weights, so the gradients are the ones a single backward gives.

The input path is every node from which the input's gradient accumulator is reachable. A weight's branch
leaves the input path at some node N (the mm of a linear layer, the mul of a norm's weight), and the
weight's gradient needs only the gradient flowing into N, which the first pass computes anyway. A
pre-hook on N keeps it; the second pass re-enters the graph at N (a GradientEdge) with the weights below
N as its only inputs, so autograd runs N's weight outputs and the branch below and never the input path.

The price: one autograd call per such N (one per weight, give or take), the dW matmuls run after their
operands left the cache, and the micro-batch's saved tensors and the kept gradients stay alive until the
weight pass (a single backward frees them as it goes). On a CPU that is 15-20% of the chunk's backward,
so parallel.pipeline splits only where the previous stage waits: each chunk's last backward of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node


def accumulator(tensor: torch.Tensor) -> Node:
    """The node that receives `tensor`'s gradient: its grad_fn, or a leaf's AccumulateGrad."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    return tensor.view_as(tensor).grad_fn.next_functions[0][0]


def _input_path(root: Node, target: Node) -> dict[Node, bool]:
    """Every node under `root` -> whether `target` is reachable from it (a post-order walk)."""
    on_path: dict[Node, bool] = {}
    stack = [root]
    while stack:
        node = stack[-1]
        if node in on_path:
            stack.pop()
            continue
        below = [n for n, _ in node.next_functions if n is not None]
        unseen = [n for n in below if n not in on_path]
        if unseen:
            stack += unseen
            continue
        stack.pop()
        on_path[node] = node is target or any(on_path[n] for n in below)
    return on_path


def _weights_below(node: Node, weights: dict[Node, torch.Tensor]) -> list[Node]:
    found, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in weights:
            found.append(n)
        stack += [m for m, _ in n.next_functions if m is not None]
    return found


def backward_input_first(
    output: torch.Tensor,
    grad: torch.Tensor | None,
    input: torch.Tensor,
    weights: Iterable[torch.Tensor],
) -> Callable[[], None]:
    """Backpropagate `grad` from `output` into `input` alone (setting `input.grad`) and return the
    weight pass, which accumulates the weights' gradients into their `.grad` (post-accumulate hooks fire
    there). Where the graph does not split into disjoint weight branches (a weight used twice, an output
    that does not depend on the input, a weight branch leaving the input path at a Python autograd
    Function) this runs one whole backward and returns a no-op."""
    by_node = {accumulator(w): w for w in weights if w.requires_grad}
    on_path = _input_path(output.grad_fn, accumulator(input))
    splits: dict[Node, list[torch.Tensor]] = {}
    claimed: set[Node] = set()
    clean = on_path.get(output.grad_fn, False)
    for node, reaches_input in on_path.items():
        if not (clean and reaches_input):
            continue
        for branch, _ in node.next_functions:
            if branch is None or on_path[branch]:
                continue
            below = _weights_below(branch, by_node)
            # A weight under two branches would get two accumulations (and its hooks two calls) where a
            # single backward sums the two contributions first and accumulates once.
            if below:
                clean = clean and claimed.isdisjoint(below)
                claimed.update(below)
                splits.setdefault(node, []).extend(by_node[w] for w in below)
    # A Python autograd Function (a collective's mapping, a compiled block) computes every input's
    # gradient in one backward call: re-entered for its weights it would run, and communicate, twice.
    clean = clean and not any(isinstance(n, BackwardCFunction) for n in splits)
    if not clean:
        if not input.is_leaf:
            input.retain_grad()  # `input.grad` as the first pass would set it
        torch.autograd.backward(output, grad)
        return lambda: None

    kept: dict[Node, tuple] = {}  # in the order the first pass reaches them: backward order
    handles = [n.register_prehook(lambda g, n=n: kept.__setitem__(n, g)) for n in splits]
    try:
        (input.grad,) = torch.autograd.grad(output, input, grad, retain_graph=True)
    finally:
        for h in handles:
            h.remove()

    def weight_pass() -> None:
        # One re-entry per split node, its weights the only inputs: a single call from every node at once
        # would flow from one node down the input path into the next node's weights a second time.
        # No node runs twice in this pass, so each call frees what it ran (retain_graph off).
        for node in list(kept):
            grads = kept.pop(node)  # freed once used, as a single backward frees them
            edges = [(GradientEdge(node, i), g) for i, g in enumerate(grads) if g is not None]
            if edges:
                torch.autograd.backward([e for e, _ in edges], [g for _, g in edges], inputs=splits[node])
        splits.clear()  # its nodes would keep the graph alive after the caller lets the output go

    return weight_pass

"""Our tensor (and sequence) parallelism against PyTorch's own, measured in the same run.

    python -m dtrain.bench.tensor_parallel [--tp 2] [--sp] [--steps 20] [--warmup 3]
        [--d-model 256 --n-layers 4 --n-heads 8 --seq-len 256 --batch 8 --vocab 1024] [--csv out.csv]

The command spawns a Gloo world of `tp` CPU processes (cpu_count // tp threads each) and builds, on every
rank, two models from one config and the same canonical initial weights (dtrain.model.init_weights):

  ours     the dtrain model built for tensor parallelism (dtrain.trainer.build_model on a ProcessGrid of
           tp ranks): column/row-parallel layers, vocabulary-parallel embedding, head and cross-entropy.
  pytorch  the dense dtrain.model.Transformer parallelised with torch.distributed.tensor.parallel:
           ColwiseParallel for wq/wk/wv and w1/w3, RowwiseParallel for wo and w2, RowwiseParallel on the
           embedding, ColwiseParallel on the head with loss_parallel, and with --sp SequenceParallel on
           the norms: torchtitan's Llama plan (`tensor_parallel_pytorch.pytorch_plan`).

Both train on the same batch (random token ids from a fixed seed) with the same AdamW. A step is forward
with targets (token-loss sum) / tokens, backward, the sum of partial gradients over the tensor group
(ours; DTensor does its own), optimizer step, zero grads. The two implementations alternate step by step,
each step timed with time.perf_counter after a barrier; a step lasts as long as its slowest rank.

Before the timed steps each implementation runs one counting step (dtrain.bench.comm). For ours every
call of the torch.distributed collectives the library uses is recorded (op, tensor bytes, group size) and
converted to bytes sent per rank with ring costs (FORMULAS.md): all-reduce 2(n-1)/n*S, all-gather and
reduce-scatter (n-1)/n*S, S the full (gathered) size. That is compared with the analytic count for this
model (`analytic_bytes`); bytes are deterministic, so the two must be equal. PyTorch's collectives
(DTensor's functional collectives) are counted in its counting step at the dispatcher, as
torch.distributed.tensor.debug.CommDebugMode does, and converted the same way.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from fractions import Fraction

import torch

from dtrain.bench.cli import add_model_args, check_world, config_of, exit_status
from dtrain.bench.comm import (
    AFTER,
    ALL_GATHER,
    ALL_REDUCE,
    BACKWARD,
    FORWARD,
    REDUCE_SCATTER,
    UNWATCHED,
    CollectiveCounter,
    CollectiveRecorder,
    Phase,
    ring_bytes,
)
from dtrain.bench.report import publish
from dtrain.bench.tensor_parallel_pytorch import build_pytorch
from dtrain.bench.tensor_parallel_report import LABELS, csv_rows, format_table, summarise
from dtrain.bench.timing import after_barrier, alternate, slowest
from dtrain.bench.world import say, spawn


@dataclass
class Analytic:
    """Bytes sent per rank per step by our model, from the shapes alone."""

    formulas: Fraction  # FORMULAS.md's per-layer figure (4 all-reduces of b*s*h) times layers
    terms: list[tuple[str, Fraction]]  # every collective our model issues in a step, grouped

    @property
    def total(self) -> Fraction:
        return sum((v for _, v in self.terms), Fraction(0))


def analytic_bytes(cfg, batch: int, seq_len: int) -> Analytic:
    """What our tensor-parallel model sends per rank in one training step, in the default dtype.

    Without SP: per layer the attention and the MLP each leave through an all-reduce (forward) and are
    entered through copy_to_tp, whose backward all-reduces: 4 all-reduces of b*s*h per layer. Besides, the
    vocabulary-parallel embedding's output is all-reduced in forward, the head's region entry all-reduces
    in backward, and the vocabulary-parallel cross-entropy all-reduces three b*s vectors (max, sum of
    exponentials, target logit) in forward. With SP each all-reduce of b*s*h becomes an all-gather plus a
    reduce-scatter (same volume), and the norm gains' partial gradients (2 per layer + the final norm, h
    each) are summed by one all-reduce, which also carries the partial gradients of k/v weights
    replicated over the tensor group (fewer k/v heads than tp; none with the benchmark's config).
    """
    m, n, sp = cfg.model, cfg.parallel.tp, cfg.parallel.sp
    itemsize = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    act = batch * seq_len * m.d_model * itemsize  # one (b, s, h) activation or its gradient
    L = m.n_layers
    ar = ring_bytes(ALL_REDUCE, act, n)
    terms: list[tuple[str, Fraction]] = []
    if sp:
        pair = ring_bytes(ALL_GATHER, act, n) + ring_bytes(REDUCE_SCATTER, act, n)
        terms += [
            ("blocks: 2 all-gathers + 2 reduce-scatters of b*s*h fwd, same bwd, per layer", L * 4 * pair),
            ("embedding: reduce-scatter of b*s*h fwd, all-gather bwd", pair),
            ("head input: all-gather of b*s*h fwd, reduce-scatter bwd", pair),
        ]
    else:
        terms += [
            ("blocks: 2 all-reduces of b*s*h fwd + 2 bwd, per layer", L * 4 * ar),
            ("embedding: all-reduce of b*s*h fwd", ar),
            ("head input (copy_to_tp): all-reduce of b*s*h bwd", ar),
        ]
    ce_bytes = batch * seq_len * max(itemsize, 4)  # the loss widens the logits to at least fp32
    terms.append(
        ("vocab-parallel cross-entropy: 3 all-reduces of b*s fwd", 3 * ring_bytes(ALL_REDUCE, ce_bytes, n))
    )
    partial = (2 * L + 1) * m.d_model if sp else 0  # norm gains
    kv = m.n_kv_heads or m.n_heads
    if kv < n:
        partial += L * 2 * kv * (m.d_model // m.n_heads) * m.d_model  # replicated wk, wv
    if partial:
        label = "sum_partial_grads: 1 all-reduce of the partial grads ((2L+1)*h norm gains)"
        terms.append((label, ring_bytes(ALL_REDUCE, partial * itemsize, n)))
    return Analytic(formulas=L * 4 * ar, terms=terms)


def make_config(args, world_size: int):
    """The config of both models: tp ranks (with --sp, sequence parallelism), one batch of --batch rows."""
    return config_of(
        args,
        [
            f"parallel.tp={args.tp}",
            f"parallel.sp={str(args.sp).lower()}",
            f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.batch}",
        ],
        world_size,
    )


def build_ours(cfg):
    """Returns the step function of our model; it returns the loss (token mean) as a float."""
    from dtrain.trainer import build_model, build_optimizer
    from parallel.grid import ProcessGrid
    from parallel.sharding import sum_partial_grads

    grid = ProcessGrid(tp=cfg.parallel.tp, dp=1)
    model = build_model(cfg, grid, torch.device("cpu"))
    model.train()
    opt = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs: torch.Tensor, targets: torch.Tensor, phase: Phase = UNWATCHED) -> float:
        phase.name = FORWARD
        loss = model(inputs, targets) / targets.numel()
        phase.name = BACKWARD
        loss.backward()
        phase.name = AFTER
        sum_partial_grads(params, grid.tp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def batch_of(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def timed_step(step, inputs: torch.Tensor, targets: torch.Tensor, _index: int) -> tuple[float, list[float]]:
    """One step after a barrier: its loss and this rank's [step time] (s). Every step trains on the same
    batch, so the step index is not needed."""
    loss, started, ended = after_barrier(step, inputs, targets)
    return loss, [ended - started]


def measure(rank: int, args) -> dict:
    """Runs on every rank of an initialised world; returns this rank's view (step times are the max over
    ranks)."""
    from dtrain.config import d_ff_of

    cfg = make_config(args, args.tp)
    inputs, targets = batch_of(args)
    say(rank, f"[bench] building both models (tp={args.tp}, sp={args.sp})")
    steps = {"ours": build_ours(cfg)}
    pytorch_error = None
    try:
        steps["pytorch"] = build_pytorch(cfg)
    except Exception as e:  # reported as not measured, never replaced by a number
        pytorch_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        say(rank, f"[bench] PyTorch tensor parallelism could not be built: {pytorch_error}")

    losses: dict[str, list[float]] = {name: [] for name in steps}
    comm = {}
    for name, step in steps.items():  # one counting step each, not timed
        phase = Phase()
        with CollectiveCounter(phase) as counter, CollectiveRecorder(phase) as recorder:
            losses[name].append(step(inputs, targets, phase))
        # Disjoint: the recorder sees torch.distributed calls, the counter's bytes are functional ones.
        comm[name] = {"calls": recorder.calls + counter.calls, "counts": dict(counter.counts)}
    say(
        rank, "[bench] counting step: " + ", ".join(f"{LABELS[k]} loss {v[0]:.4f}" for k, v in losses.items())
    )

    timed = {name: functools.partial(timed_step, step, inputs, targets) for name, step in steps.items()}
    records = alternate(rank, timed, losses, args.warmup, args.steps, LABELS)
    return {
        "times": {name: slowest([r[0] for r in rows]) for name, rows in records.items()},
        "losses": losses,
        "comm": comm,
        "pytorch_error": pytorch_error,
        "analytic": analytic_bytes(cfg, args.batch, args.seq_len),
        "d_ff": d_ff_of(cfg.model),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.tensor_parallel",
        description="dtrain's tensor parallelism against PyTorch's (DTensor), same model and batch, one run",
    )
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (processes spawned)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism too (both implementations)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation before")
    add_model_args(p, n_layers=4, seq_len=256, batch=("--batch", 8, None))
    p.add_argument("--csv", default=None, help="also write one summary row per implementation to this file")
    args = p.parse_args(argv)
    check_world(p, args, args.tp, "--tp", "tensor parallelism")
    return args


def run(argv=None) -> dict:
    """Spawn the tp ranks, measure both implementations, print the table (rank 0's results) and return the
    summary."""
    args = parse_args(argv)
    make_config(args, args.tp)  # a bad config fails here, before any process starts
    return publish(summarise(args, spawn(measure, args, args.tp)), format_table, csv_rows, args.csv)


def main(argv=None) -> int:
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())

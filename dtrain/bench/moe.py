"""Expert-parallel dispatch: our all-to-all against an all-gather dispatcher, and expert load in training.

    python -m dtrain.bench.moe [--ep 2] [--experts 8] [--top-k 2] [--capacity-factor 1.25] [--tokens 1024]
        [--steps 10] [--warmup 2] [--train-steps 40] [--dtype float32]
        [--d-model 256 --d-ff D --n-layers 2 --n-heads 8 --seq-len 64 --micro-batch 4 --vocab 1024]
        [--csv out.csv] [--load-csv load.csv]

A Gloo world of `ep` CPU processes (one expert-parallel group, cpu_count // ep threads each) measures two
things in one run.

1. Dispatch, on one parallel.moe.MoELayer (forward + backward), every rank routing its own --tokens
   tokens (random, fixed seed per rank) with the same router and its E/ep experts (canonical tensors of
   all E experts from one seed, this rank's slice):

     all-to-all  ours: MoELayer.forward, i.e. parallel.expert_parallel.run_experts: a count exchange, then
                 all_to_all_single of the kept (token, expert) rows with uneven splits to the ranks that
                 hold their experts, the experts, and the reverse all-to-all (backward: the same two
                 all-to-alls with the splits swapped).
     all-gather  `allgather_forward` below, Megatron-Core's "allgather" token dispatcher: all-gather every
                 rank's tokens (not rows: each token once), their slot experts (-1 for a dropped slot) and
                 gate weights over the ep group; each rank runs its experts on the gathered tokens routed
                 to them and sums the weighted results per gathered token; a reduce-scatter returns every
                 rank the sums for its own tokens (backward: reduce-scatter of the token gradients,
                 all-gather of the output gradients). Routing, capacity and gate weights are MoELayer's.

   One untimed counting step per dispatcher records its collectives (`AllToAllRecorder`: comm's recorder
   plus all_to_all_single, which it counts exactly, as the bytes of the rows bound for other ranks) and
   keeps its output and gradients; the two must agree. The analytic counts: all-to-all from the rows each
   rank actually sends (`alltoall_analytic`, from every rank's kept rows per expert), which the measured
   bytes must equal exactly, set against FORMULAS.md's balanced-routing figure, 4 all-to-alls per layer
   step (dispatch and combine, forward and backward) of (ep-1)/ep * T*k*d*bytes each; all-gather from
   the ring cost (n-1)/n * S of each collective (`allgather_analytic`). Then warm-up and timed steps of
   the two alternate, each after a barrier; each rank's median step time and the slowest rank's.

2. Expert load over training: the dtrain Trainer (parallel.dp = parallel.ep = ep, the model flags with
   every block's MLP a mixture of experts, synthetic data) for --train-steps steps, recording each
   step's `moe/layer{i}/tokens_per_expert` and `moe/layer{i}/dropped_frac` (StepResult.moe). The report
   shows max/mean and min/mean expert load, dropped share and load-balancing loss at the first, middle
   and last step; --load-csv writes every step.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import sys
import time
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtrain.bench.cli import add_model_args, check_world, config_of, exit_status
from dtrain.bench.comm import (
    ALL_GATHER,
    ALL_TO_ALL,
    BACKWARD,
    FORWARD,
    REDUCE_SCATTER,
    UNWATCHED,
    Call,
    CollectiveRecorder,
    Phase,
    ring_bytes,
)
from dtrain.bench.moe_report import COUNT_EXCHANGE, SHORT, csv_rows, format_table, summarise, write_load_csv
from dtrain.bench.report import publish
from dtrain.bench.timing import after_barrier, alternate, slowest
from dtrain.bench.world import gather, say, spawn
from parallel.collectives import gather_from_sp, reduce_scatter_to_sp
from parallel.expert_parallel import group_size
from parallel.moe import MoELayer, Routing, expert_capacity, route
from parallel.precision import wide

ID_BYTES = 8  # expert ids and counts travel as int64


@dataclass
class AllToAllCall(Call):
    """An all_to_all_single: `leaving` bytes of its input go to other ranks (uneven splits, so not the ring
    figure (n-1)/n * S)."""

    leaving: int = 0

    @property
    def sent(self) -> Fraction:
        return Fraction(self.leaving)


class AllToAllRecorder(CollectiveRecorder):
    """comm.CollectiveRecorder plus dist.all_to_all_single, counted exactly: the input rows of every split
    but this rank's own, times the bytes of a row."""

    def __enter__(self) -> AllToAllRecorder:
        super().__enter__()
        self._all_to_all = fn = dist.all_to_all_single
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x, group = a["input"], a["group"]
            n, me = dist.get_world_size(group), dist.get_rank(group)
            splits = a["input_split_sizes"] or [x.shape[0] // n] * n
            row = math.prod(x.shape[1:]) * x.element_size()
            full = x.numel() * x.element_size()
            self.calls.append(
                AllToAllCall(ALL_TO_ALL, full, n, self.phase.name, (x.shape[0] - splits[me]) * row)
            )
            return fn(*args, **kwargs)

        dist.all_to_all_single = wrapper
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._all_to_all
        super().__exit__(*exc)


def routing_of(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """MoELayer.forward's routing of x (batch, seq, d): its tokens in priority order and their Routing."""
    b, s, d = x.shape
    tokens = x.transpose(0, 1).reshape(s * b, d)
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(wide(tokens), wide(layer.router.weight))
    capacity = expert_capacity(layer.capacity_factor, b * s, layer.top_k, layer.num_experts)
    return tokens, route(logits, layer.top_k, capacity, b * s)


def allgather_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output through the all-gather dispatcher (Megatron-Core's MoEAllGatherTokenDispatcher):
    the same routing and experts as MoELayer.forward, tokens moved by all-gather and reduce-scatter."""
    group = layer.ep_group
    b, s, d = x.shape
    k, local = layer.top_k, layer.num_experts // group_size(group)
    tokens, r = routing_of(layer, x)
    slot_expert = torch.where(r.keep, r.expert, -1)  # (T, k); a dropped slot runs nowhere
    # gather_from_sp: all-gather on dim 1 in forward, reduce-scatter of the gradient in backward.
    all_tokens = gather_from_sp(tokens.unsqueeze(0), group)[0]  # (ep*T, d), source rank major
    all_expert = gather_from_sp(slot_expert.unsqueeze(0), group)[0].flatten()  # (ep*T*k,)
    all_weight = gather_from_sp(r.weight.unsqueeze(0), group)[0].flatten()
    local_expert = all_expert - dist.get_rank(group) * local
    slot = ((local_expert >= 0) & (local_expert < local)).nonzero().squeeze(-1)
    # Grouped by local expert, then (source rank, token, choice): the batches run_experts hands them.
    slot = slot[torch.argsort(local_expert[slot], stable=True)]
    counts = torch.bincount(local_expert[slot], minlength=local).tolist()
    token = slot // k
    y = layer.experts(all_tokens.index_select(0, token), counts)
    weighted = (y * all_weight[slot].unsqueeze(-1)).to(x.dtype)
    partial = torch.zeros_like(all_tokens).index_add(0, token, weighted)  # this rank's experts' share
    # reduce_scatter_to_sp: reduce-scatter on dim 1 in forward, all-gather of the gradient in backward.
    out = reduce_scatter_to_sp(partial.unsqueeze(0), group)[0]
    return out.view(s, b, d).transpose(0, 1)


def alltoall_rows(counts: list[list[int]], rank: int, local: int) -> tuple[int, int]:
    """(rows rank `rank` sends to other ranks, rows it receives from them) in one dispatch, counts[s][e]
    being the kept rows of rank s routed to expert e (rank r holds experts [r*local, (r+1)*local))."""
    mine = range(rank * local, (rank + 1) * local)
    leaving = sum(c for e, c in enumerate(counts[rank]) if e not in mine)
    arriving = sum(counts[s][e] for s in range(len(counts)) if s != rank for e in mine)
    return leaving, arriving


def alltoall_analytic(
    counts: list[list[int]], rank: int, d: int, itemsize: int
) -> list[tuple[str, Fraction]]:
    """Bytes rank `rank` sends in one forward + backward of the layer through run_experts: the count
    exchange (E int64, all but its own E/ep), then per all-to-all the rows leaving the rank times d times
    the element size. The combine sends back the rows that arrived; backward runs the adjoints, combine
    then dispatch, with the splits swapped: the same rows again."""
    ep, experts = len(counts), len(counts[0])
    local = experts // ep
    leaving, arriving = alltoall_rows(counts, rank, local)
    row = d * itemsize
    return [
        (COUNT_EXCHANGE, Fraction((ep - 1) * local * ID_BYTES)),
        (f"dispatch fwd: {leaving} rows leave x d x bytes", Fraction(leaving * row)),
        (f"combine fwd: the {arriving} rows that arrived go back", Fraction(arriving * row)),
        (f"combine bwd (adjoint): {leaving} rows", Fraction(leaving * row)),
        (f"dispatch bwd (adjoint): {arriving} rows", Fraction(arriving * row)),
    ]


def formulas_alltoall(ep: int, tokens: int, top_k: int, d: int, itemsize: int) -> Fraction:
    """FORMULAS.md, balanced routing, before dropping: one all-to-all moves (ep-1)/ep * T*k*d*bytes."""
    return ring_bytes(ALL_TO_ALL, tokens * top_k * d * itemsize, ep)


def allgather_analytic(
    ep: int, tokens: int, top_k: int, d: int, itemsize: int, weight_itemsize: int
) -> list[tuple[str, Fraction]]:
    """Bytes one rank sends in one forward + backward through `allgather_forward`: ring costs (n-1)/n * S
    with S the gathered (full) size of each collective."""
    act = ep * tokens * d * itemsize
    ids = ep * tokens * top_k * ID_BYTES
    gates = ep * tokens * top_k * weight_itemsize
    return [
        ("tokens fwd: all-gather of ep*T*d", ring_bytes(ALL_GATHER, act, ep)),
        ("slot experts fwd: all-gather of ep*T*k int64", ring_bytes(ALL_GATHER, ids, ep)),
        ("gate weights fwd: all-gather of ep*T*k", ring_bytes(ALL_GATHER, gates, ep)),
        ("combine fwd: reduce-scatter of ep*T*d", ring_bytes(REDUCE_SCATTER, act, ep)),
        ("combine bwd: all-gather of ep*T*d", ring_bytes(ALL_GATHER, act, ep)),
        ("gate weights bwd: reduce-scatter of ep*T*k", ring_bytes(REDUCE_SCATTER, gates, ep)),
        ("tokens bwd: reduce-scatter of ep*T*d", ring_bytes(REDUCE_SCATTER, act, ep)),
    ]


def make_config(args):
    """The training run's config, whose model section also shapes the dispatch layer: ep ranks, each a
    data-parallel rank of one micro-batch per step, every block's MLP a mixture of experts."""
    overrides = [
        f"model.moe.num_experts={args.experts}",
        f"model.moe.top_k={args.top_k}",
        f"model.moe.capacity_factor={args.capacity_factor}",
        f"parallel.dp={args.ep}",
        f"parallel.ep={args.ep}",
        f"train.global_batch_size={args.ep * args.micro_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.steps={max(1, args.train_steps)}",
        f"train.warmup_steps={min(10, args.train_steps // 4)}",
        "train.eval_batches=0",
    ]
    if args.d_ff is not None:
        overrides.append(f"model.d_ff={args.d_ff}")
    return config_of(args, overrides, args.ep)


def build_layer(cfg, grid, dtype: torch.dtype, seed: int) -> MoELayer:
    """One MoE layer of the config on this rank of the ep group: the router (the same on every rank) and
    this rank's slice of the canonical expert tensors, drawn from `seed` with the model's init_std."""
    from dtrain.config import d_ff_of

    m = cfg.model
    moe = m.moe
    layer = MoELayer(
        m.d_model,
        d_ff_of(m),
        moe.num_experts,
        moe.top_k,
        moe.capacity_factor,
        moe.aux_loss_coef,
        moe.z_loss_coef,
        ep_group=grid.ep_group,
    )
    gen = torch.Generator().manual_seed(seed)
    local = moe.num_experts // grid.size("ep")
    first = grid.rank_in("ep") * local
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * m.init_std)
        for w in layer.experts.parameters():
            full = torch.randn((moe.num_experts, *w.shape[1:]), generator=gen) * m.init_std
            w.copy_(full[first : first + local])
    return layer.to(dtype)


class DispatchStep:
    """Forward + backward of the layer on this rank's tokens through one dispatcher. The loss is
    sum(output * a fixed random tensor), so every output element gets a gradient."""

    def __init__(self, layer: MoELayer, forward, x: torch.Tensor, grad_out: torch.Tensor):
        self.layer, self.forward, self.x, self.grad_out = layer, forward, x, grad_out

    def __call__(self, phase: Phase = UNWATCHED) -> tuple[float, dict]:
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None
        phase.name = FORWARD
        out = self.forward(self.x)
        loss = (out * self.grad_out).sum()
        phase.name = BACKWARD
        loss.backward()
        grads = {"x": self.x.grad, **{n: p.grad for n, p in self.layer.named_parameters()}}
        return float(loss.detach()), {"out": out.detach(), **grads}


def timed_step(step: DispatchStep, _index: int) -> tuple[float, list[float]]:
    (loss, _), started, ended = after_barrier(step)
    return loss, [ended - started]


def _max_diff(a: dict, b: dict) -> list[float]:
    """Largest |a - b| per tensor, and the largest |a| (the scale), in the order of `a`."""
    out = []
    for name, t in a.items():
        out += [
            float((t - b[name]).abs().max()) if t.numel() else 0.0,
            float(t.abs().max()) if t.numel() else 0.0,
        ]
    return out


def measure_dispatch(rank: int, args, cfg, grid) -> dict:
    """Part 1 on every rank of the ep group; returns the same view on every rank (per-rank figures
    gathered)."""
    dtype = getattr(torch, args.dtype)
    ep, experts, k, d = args.ep, args.experts, args.top_k, cfg.model.d_model
    layer = build_layer(cfg, grid, dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    x = torch.randn(1, args.tokens, d, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(1, args.tokens, d, generator=gen).to(dtype)
    steps = {
        "alltoall": DispatchStep(layer, layer, x, grad_out),
        "allgather": DispatchStep(layer, functools.partial(allgather_forward, layer), x, grad_out),
    }
    with torch.no_grad():
        _, r = routing_of(layer, x)
    kept = r.expert[r.keep]
    counts = [[int(c) for c in row] for row in gather(torch.bincount(kept, minlength=experts).tolist(), ep)]
    itemsize, weight_itemsize = x.element_size(), r.weight.element_size()

    losses: dict[str, list[float]] = {name: [] for name in steps}
    results, calls = {}, {}
    for name, step in steps.items():  # one counting step each, not timed
        phase = Phase()
        with AllToAllRecorder(phase) as recorder:
            loss, results[name] = step(phase)
        losses[name].append(loss)
        calls[name] = recorder.calls
    say(rank, "[bench] counting step: " + ", ".join(f"{SHORT[n]} loss {v[0]:.6f}" for n, v in losses.items()))
    names = list(results["alltoall"])
    diffs = gather(_max_diff(results["alltoall"], results["allgather"]), ep)
    identical = gather(
        [float(all(torch.equal(results["alltoall"][n], results["allgather"][n]) for n in names))], ep
    )

    timed = {name: functools.partial(timed_step, step) for name, step in steps.items()}
    records = alternate(rank, timed, losses, args.warmup, args.steps, SHORT, first_index=1)
    per_rank = {name: gather([row[0] for row in rows], ep) for name, rows in records.items()}
    analytic = {
        "alltoall": alltoall_analytic(counts, rank, d, itemsize),
        "allgather": allgather_analytic(ep, args.tokens, k, d, itemsize, weight_itemsize),
    }
    mine = {"calls": calls, "analytic": analytic}
    everyone: list = [None] * ep
    dist.all_gather_object(everyone, mine)  # Fractions stay exact
    return {
        "times": {name: slowest([row[0] for row in rows]) for name, rows in records.items()},
        "per_rank_times": per_rank,
        "losses": losses,
        "counts": counts,
        "capacity": expert_capacity(args.capacity_factor, args.tokens, k, experts),
        "diff_names": names,
        "diffs": diffs,
        "identical": [bool(v[0]) for v in identical],
        "per_rank": everyone,
        "formulas_per_all_to_all": formulas_alltoall(ep, args.tokens, k, d, itemsize),
        "itemsize": itemsize,
        "d_ff": layer.experts.w1.shape[1],
    }


def measure_load(rank: int, args, cfg, grid) -> list[dict]:
    """Part 2: the Trainer's per-step routing metrics (the same on every rank: all-reduced)."""
    from dtrain.trainer import Trainer

    trainer = Trainer(cfg, grid, torch.device("cpu"))
    records = []
    every = max(1, args.train_steps // 5)
    for i in range(args.train_steps):
        started = time.perf_counter()
        result = trainer.train_step()
        records.append(
            {"step": i + 1, "loss": result.loss, "time_s": time.perf_counter() - started, **result.moe}
        )
        if i == 0 or (i + 1) % every == 0:
            say(rank, f"[bench] training step {i + 1}/{args.train_steps}  loss {result.loss:.4f}")
    return records


def measure(rank: int, args) -> dict:
    """Runs on every rank of an initialised world; returns rank 0's view."""
    from parallel.grid import ProcessGrid

    cfg = make_config(args)
    grid = ProcessGrid(dp=args.ep, ep=args.ep)
    say(rank, f"[bench] dispatch: one MoE layer, {args.tokens} tokens per rank, {args.dtype}")
    out = {"dispatch": measure_dispatch(rank, args, cfg, grid), "load": []}
    if args.train_steps:
        say(rank, f"[bench] expert load: training {args.train_steps} steps")
        out["load"] = measure_load(rank, args, cfg, grid)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.moe",
        description="MoE dispatch, our all-to-all against an all-gather dispatcher; expert load in training",
    )
    p.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (processes spawned)")
    p.add_argument("--experts", type=int, default=8, help="model.moe.num_experts")
    p.add_argument("--top-k", type=int, default=2, help="model.moe.top_k")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="model.moe.capacity_factor")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank in the dispatch comparison")
    p.add_argument("--d-ff", type=int, default=None, help="expert width (default: the Llama rule)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dispatch comparison")
    p.add_argument("--steps", type=int, default=10, help="timed dispatch steps per dispatcher")
    p.add_argument("--warmup", type=int, default=2, help="untimed dispatch steps per dispatcher before")
    p.add_argument("--train-steps", type=int, default=40, help="Trainer steps for the load report (0: none)")
    add_model_args(p, n_layers=2, seq_len=64, batch=("--micro-batch", 4, "rows per rank per training step"))
    p.add_argument("--timeout", type=float, default=300.0, help="Gloo timeout (s)")
    p.add_argument("--csv", default=None, help="also write one summary row per dispatcher to this file")
    p.add_argument("--load-csv", default=None, help="also write the load metrics of every step to this file")
    args = p.parse_args(argv)
    check_world(p, args, args.ep, "--ep", "expert parallelism")
    if args.tokens < 1 or args.train_steps < 0:
        p.error("--tokens must be at least 1 and --train-steps at least 0")
    if args.experts >= 1 and expert_capacity(args.capacity_factor, args.tokens, args.top_k, args.experts) < 1:
        p.error(
            f"--capacity-factor {args.capacity_factor} leaves the experts no room for {args.tokens} tokens"
        )
    return args


def run(argv=None) -> dict:
    """Spawn the ep ranks, measure, print the tables (rank 0's results) and return the summary."""
    args = parse_args(argv)
    make_config(args)  # a bad config fails here, before any process starts
    raw = spawn(measure, args, args.ep, args.timeout)
    summary = publish(summarise(args, raw), format_table, csv_rows, args.csv)
    if args.load_csv and summary["load"]["steps"]:
        write_load_csv(args.load_csv, summary)
        print(f"[bench] wrote {args.load_csv}", flush=True)
    return summary


def main(argv=None) -> int:
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())

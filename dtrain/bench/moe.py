"""Expert-parallel dispatch: our all-to-all against an all-gather dispatcher, and expert load in training.

    python -m dtrain.bench.moe [--ep 2] [--experts 8] [--top-k 2] [--capacity-factor 1.25] [--tokens 1024]
        [--steps 10] [--warmup 2] [--train-steps 40] [--dtype float32]
        [--d-model 256 --d-ff D --n-layers 2 --n-heads 8 --seq-len 64 --micro-batch 4 --vocab 1024]
        [--csv out.csv] [--load-csv load.csv]

PyTorch has no expert parallelism, so the peer is a dispatcher written here. Two parts, one world of `ep`
ranks (one expert-parallel group):

1. Dispatch through one parallel.moe.MoELayer (forward + backward), every rank routing its own --tokens
   random tokens with the same router and its E/ep experts (this rank's slice of canonical tensors):
     all-to-all  ours, MoELayer.forward (parallel.expert_parallel.run_experts): a count exchange, the kept
                 (token, expert) rows by all_to_all_single with uneven splits to the ranks holding their
                 experts, the experts, the reverse all-to-all; backward the same two, splits swapped.
     all-gather  `allgather_forward`, Megatron-Core's "allgather" dispatcher: all-gather every rank's
                 tokens (each once), slot experts and gate weights; each rank runs its experts on the
                 gathered tokens routed to them and a reduce-scatter returns every rank its tokens' sums.
   The counting step records the collectives (comm.CommRecorder: an all-to-all as the bytes of the rows
   bound for other ranks) and keeps outputs and gradients, which must agree. Our bytes must equal the rows
   each rank actually sends (`alltoall_analytic`), set against docs/formulas.md's balanced figure, 4
   all-to-alls of (ep-1)/ep * T*k*d*bytes per layer step; the all-gather's, the ring cost of each collective.

2. Expert load: the dtrain Trainer (dp = ep, every block's MLP a mixture of experts, synthetic data) for
   --train-steps steps; each step's StepResult.moe gives the tokens per expert and dropped share per layer,
   shown at the first, middle and last step (--load-csv: every step).
"""

from __future__ import annotations

import functools
import statistics
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtrain.bench import comm, harness, report
from dtrain.config import d_ff_of
from parallel.collectives import gather_from_sp, reduce_scatter_to_sp
from parallel.expert_parallel import group_size
from parallel.grid import ProcessGrid
from parallel.moe import MoELayer, Routing, expert_capacity, route
from parallel.precision import wide

ID_BYTES = 8  # expert ids and counts travel as int64
LABELS = {"alltoall": "all-to-all (ours)", "allgather": "all-gather"}
SHORT = {"alltoall": "a2a", "allgather": "ag"}
COUNT_EXCHANGE = "count exchange fwd: all-to-all of E int64 (E/ep to each peer)"


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
    """docs/formulas.md, balanced routing, before dropping: one all-to-all moves (ep-1)/ep * T*k*d*bytes."""
    return comm.ring_bytes(comm.ALL_TO_ALL, tokens * top_k * d * itemsize, ep)


def allgather_analytic(
    ep: int, tokens: int, top_k: int, d: int, itemsize: int, weight_itemsize: int
) -> list[tuple[str, Fraction]]:
    """Bytes one rank sends in one forward + backward through `allgather_forward`: ring costs (n-1)/n * S
    with S the gathered (full) size of each collective."""
    act = ep * tokens * d * itemsize
    ids = ep * tokens * top_k * ID_BYTES
    gates = ep * tokens * top_k * weight_itemsize
    return [
        ("tokens fwd: all-gather of ep*T*d", comm.ring_bytes(comm.ALL_GATHER, act, ep)),
        ("slot experts fwd: all-gather of ep*T*k int64", comm.ring_bytes(comm.ALL_GATHER, ids, ep)),
        ("gate weights fwd: all-gather of ep*T*k", comm.ring_bytes(comm.ALL_GATHER, gates, ep)),
        ("combine fwd: reduce-scatter of ep*T*d", comm.ring_bytes(comm.REDUCE_SCATTER, act, ep)),
        ("combine bwd: all-gather of ep*T*d", comm.ring_bytes(comm.ALL_GATHER, act, ep)),
        ("gate weights bwd: reduce-scatter of ep*T*k", comm.ring_bytes(comm.REDUCE_SCATTER, gates, ep)),
        ("tokens bwd: reduce-scatter of ep*T*d", comm.ring_bytes(comm.REDUCE_SCATTER, act, ep)),
    ]


def configs(args):
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
    return harness.config_of(args, overrides, args.ep)


def build_layer(cfg, grid, dtype: torch.dtype, seed: int) -> MoELayer:
    """One MoE layer of the config on this rank of the ep group: the router (the same on every rank) and
    this rank's slice of the canonical expert tensors, drawn from `seed` with the model's init_std."""
    m, moe = cfg.model, cfg.model.moe
    shape = (m.d_model, d_ff_of(m), moe.num_experts, moe.top_k, moe.capacity_factor)
    layer = MoELayer(*shape, moe.aux_loss_coef, moe.z_loss_coef, ep_group=grid.ep_group)
    gen = torch.Generator().manual_seed(seed)
    local = moe.num_experts // grid.size("ep")
    first = grid.rank_in("ep") * local
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * m.init_std)
        for w in layer.experts.parameters():
            full = torch.randn((moe.num_experts, *w.shape[1:]), generator=gen) * m.init_std
            w.copy_(full[first : first + local])
    return layer.to(dtype)


class DispatchStep(harness.Implementation):
    """Forward + backward of the layer on this rank's tokens through one dispatcher; the loss is
    sum(output * a fixed random tensor), so every output element gets a gradient. `results` holds the
    last step's output and gradients."""

    def __init__(self, layer: MoELayer, forward, x: torch.Tensor, grad_out: torch.Tensor):
        super().__init__()
        self.layer, self.forward, self.x, self.grad_out = layer, forward, x, grad_out

    def step(self, index: int) -> float:
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None
        self.phase.name = comm.FORWARD
        out = self.forward(self.x)
        loss = (out * self.grad_out).sum()
        self.phase.name = comm.BACKWARD
        loss.backward()
        self.results = {"out": out.detach(), "x": self.x.grad}
        self.results |= {n: p.grad for n, p in self.layer.named_parameters()}
        return float(loss.detach())


def count_step(impl: DispatchStep, index: int) -> tuple[float, dict]:
    with comm.CommRecorder(impl.phase) as recorder:
        loss = impl.step(index)
    return loss, (impl.results, recorder.calls)


def measure_dispatch(rank: int, args, cfg, grid) -> dict:
    """Part 1 on every rank of the ep group; rank 0's result is its summary."""
    dtype, ep, k, d = getattr(torch, args.dtype), args.ep, args.top_k, cfg.model.d_model
    layer = build_layer(cfg, grid, dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    x = torch.randn(1, args.tokens, d, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(1, args.tokens, d, generator=gen).to(dtype)
    builders = {
        "alltoall": lambda: DispatchStep(layer, layer, x, grad_out),
        "allgather": lambda: DispatchStep(layer, functools.partial(allgather_forward, layer), x, grad_out),
    }
    with torch.no_grad():
        _, r = routing_of(layer, x)
    counts = harness.gather(torch.bincount(r.expert[r.keep], minlength=args.experts).tolist(), ep)
    done = harness.contest(rank, builders, SHORT, args.warmup, args.steps, count_step)
    if done.errors:
        raise RuntimeError(f"a dispatcher failed: {done.errors}")
    (a2a, calls_a2a), (ag, calls_ag) = (done.counted[name][0] for name in ("alltoall", "allgather"))
    itemsize, names = x.element_size(), list(a2a)
    analytic = {
        "alltoall": alltoall_analytic(counts, rank, d, itemsize),
        "allgather": allgather_analytic(ep, args.tokens, k, d, itemsize, r.weight.element_size()),
    }
    mine = {"calls": {"alltoall": calls_a2a, "allgather": calls_ag}, "analytic": analytic}
    # largest |a2a - ag| per tensor, and its scale: the largest |a2a|
    diffs = {n: (float((t - ag[n]).abs().max()), float(t.abs().max())) for n, t in a2a.items() if t.numel()}
    mine |= {"diffs": diffs, "identical": all(torch.equal(a2a[n], ag[n]) for n in names)}
    everyone = harness.gather(mine, ep)
    formulas_step = 4 * formulas_alltoall(ep, args.tokens, k, d, itemsize)
    impls = {}
    for name in done.impls:
        ranks = []
        for i, view in enumerate(everyone):
            calls, terms = view["calls"][name], view["analytic"][name]
            measured, exact = (
                sum((c.sent for c in calls), Fraction(0)),
                sum((v for _, v in terms), Fraction(0)),
            )
            ranks.append({"median_s": statistics.median(row[0] for row in done.per_rank[name][i])})
            ranks[-1] |= {
                "measured_bytes": measured,
                "analytic_bytes": exact,
                "bytes_match": measured == exact,
            }
            ranks[-1] |= {"terms": terms, "calls": calls}
            if name == "alltoall":  # the token rows against docs/formulas.md (the counts are extra)
                rows = sum((v for label, v in terms if label != COUNT_EXCHANGE), Fraction(0))
                ranks[-1] |= {"row_bytes": rows, "over_formulas": rows / formulas_step}
        impls[name] = done.summary(name) | {"ranks": ranks}
    diffs = {n: tuple(max(view["diffs"][n][i] for view in everyone) for i in (0, 1)) for n in diffs}
    return {
        "d_ff": layer.experts.w1.shape[1],
        "itemsize": itemsize,
        "capacity": expert_capacity(args.capacity_factor, args.tokens, k, args.experts),
        "counts": counts,
        "kept_slots": sum(map(sum, counts)),
        "routed_slots": ep * args.tokens * k,
        "impls": impls,
        "ratio": impls["alltoall"]["median_s"] / impls["allgather"]["median_s"],
        "diffs": diffs,
        "max_diff": max(v[0] for v in diffs.values()),
        "identical": all(v["identical"] for v in everyone),
        "formulas_step": formulas_step,
        "bytes_match": all(r["bytes_match"] for impl in impls.values() for r in impl["ranks"]),
    }


def summarise_load(args, results: list, times: list[float]) -> dict:
    """A row per training step and MoE layer: the expert loads (slots routed to each expert, before
    dropping, over every rank), their max and min over the mean, the dropped share and the load-balancing
    loss; the first, middle and last step are the ones the table shows."""
    slots, rows = (
        args.ep * args.micro_batch * args.seq_len * args.top_k,
        [],
    )  # a micro-batch per rank and step
    for step, (result, step_s) in enumerate(zip(results, times, strict=True), 1):
        for key in sorted(k for k in result.moe if k.endswith("/tokens_per_expert")):
            layer, counts = key.split("/")[1], result.moe[key]
            row = {
                "step": step,
                "layer": int(layer.removeprefix("layer")),
                "loss": result.loss,
                "step_s": step_s,
            }
            row |= {"max_over_mean": max(counts) * len(counts) / sum(counts)}
            row |= {"min_over_mean": min(counts) * len(counts) / sum(counts)}
            row |= {k: result.moe[f"moe/{layer}/{k}"] for k in ("dropped_frac", "aux_loss")}
            rows.append(row | {"counts": counts})
    n = len(results)
    return {
        "rows": rows,
        "steps": n,
        "layers": sorted({r["layer"] for r in rows}),
        "slots_per_step": slots,
        "picks": sorted({1, (n + 1) // 2, n}) if n else [],
        "sums_match": all(sum(r["counts"]) == slots for r in rows),
    }


def measure(rank: int, args) -> dict:
    """Both parts on every rank; rank 0's result is the summary."""
    cfg, grid = configs(args), ProcessGrid(dp=args.ep, ep=args.ep)
    harness.say(rank, f"[bench] dispatch: one MoE layer, {args.tokens} tokens per rank, {args.dtype}")
    summary, results, times = measure_dispatch(rank, args, cfg, grid), [], []
    if args.train_steps:
        harness.say(rank, f"[bench] expert load: training {args.train_steps} steps")
        builders, labels = {"trainer": lambda: harness.TrainerSide(cfg, grid)}, {"trainer": "Trainer"}
        done = harness.contest(rank, builders, labels, 0, args.train_steps, untimed=0, prefix="load: ")
        results, times = done.impls["trainer"].results, done.step_times("trainer")
    return summary | {"load": summarise_load(args, results, times)}


def _dispatch_lines(s: dict) -> list[str]:
    c, ep, mib = s["config"], s["config"]["ep"], report.mib
    lines = [
        *harness.banner(
            f"MoE dispatch: ep={ep}, {c['experts']} experts ({c['experts'] // ep} per rank), "
            f"top-{c['top_k']}, capacity factor {c['capacity_factor']}",
            ep,
            f"one MoE layer d_model={c['d_model']} d_ff={s['d_ff']} ({c['dtype']}), forward + backward; T = "
            f"{c['tokens']} tokens per rank, capacity {s['capacity']} slots per expert; kept "
            f"{s['kept_slots']} of {s['routed_slots']} routed slots over all ranks",
        ),
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 counting step, the two alternating; "
        f"each step after a barrier",
        "",
        f"{'dispatcher':<20}"
        + "".join(f"{f'rank {r} median ms':>18}" for r in range(ep))
        + f"{'slowest-rank median':>21}{'mean ms':>9}",
    ]
    for name, impl in s["impls"].items():
        lines.append(
            f"{LABELS[name]:<20}"
            + "".join(f"{1e3 * r['median_s']:>18.2f}" for r in impl["ranks"])
            + f"{1e3 * impl['median_s']:>21.2f}{1e3 * impl['mean_s']:>9.2f}"
        )
    parts = ", ".join(f"{n} {v[0]:.3g} (of {v[1]:.3g})" for n, v in s["diffs"].items())
    lines += [
        f"ratio all-to-all / all-gather step time: {s['ratio']:.3f} (slowest-rank medians)",
        f"outputs and gradients, all-to-all vs all-gather, largest |difference| over ranks: {parts}; "
        f"bitwise identical: {s['identical']}",
        "",
        "bytes sent per rank per layer step (forward + backward):",
    ]
    w = 66
    for name, impl in s["impls"].items():
        for rank, r in enumerate(impl["ranks"]):
            lines.append(f"  {LABELS[name]}, rank {rank}:")
            lines += [f"    {label:<{w}}{mib(value):>10} MiB" for label, value in r["terms"]]
            lines.append(
                f"    {'measured (collectives recorded in the counting step)':<{w}}"
                f"{mib(r['measured_bytes']):>10} MiB"
                f"   == analytic: {r['bytes_match']} ({float(r['measured_bytes']):.0f} B)"
            )
            if name == "alltoall":
                lines.append(
                    f"    {'docs/formulas.md balanced: 4 all-to-alls x (ep-1)/ep * T*k*d*bytes':<{w}}"
                    f"{mib(s['formulas_step']):>10} MiB   token rows / docs/formulas.md = "
                    f"{float(r['over_formulas']):.4f}"
                )
    a2a, ag = s["impls"]["alltoall"]["ranks"], s["impls"]["allgather"]["ranks"]
    ratios = ", ".join(
        f"rank {i} {float(g['measured_bytes'] / t['measured_bytes']):.3f}"
        for i, (t, g) in enumerate(zip(a2a, ag, strict=True))
    )
    lines += [
        f"  all-gather / all-to-all bytes: {ratios} (balanced, no drops: ep/k = {ep / c['top_k']:.3f} "
        f"on the d-wide traffic)",
        "",
        "collectives per layer step (rank 0)",
    ]
    return lines + comm.tally_lines(
        {LABELS[n]: impl["ranks"][0]["calls"] for n, impl in s["impls"].items()}, 20, 12
    )


def _load_lines(s: dict) -> list[str]:
    c, load = s["config"], s["load"]
    if not load["steps"]:
        return ["", "expert load over training: not run (--train-steps 0)"]
    lines = [
        "",
        f"== expert load over training: dtrain Trainer, dp=ep={c['ep']}, {len(load['layers'])} MoE layers, "
        f"{c['experts']} experts, top-{c['top_k']}, capacity factor {c['capacity_factor']} ==",
        f"model d_model={c['d_model']} n_heads={c['n_heads']} vocab={c['vocab']}, synthetic data, "
        f"{c['ep'] * c['micro_batch'] * c['seq_len']} tokens per step ({c['micro_batch']} x {c['seq_len']} "
        f"per rank), {load['steps']} steps",
        "load = slots routed to an expert per step over all ranks, before dropping "
        "(moe/layer{i}/tokens_per_expert);",
        f"tokens per expert sum to tokens*k = {load['slots_per_step']} every step: {load['sums_match']}",
        "",
        f"{'step':>5}{'loss':>9}{'layer':>7}{'max/mean':>10}{'min/mean':>10}{'dropped':>9}{'aux loss':>10}   "
        "tokens per expert",
    ]
    for r in (r for r in load["rows"] if r["step"] in load["picks"]):
        head = f"{r['step']:>5}{r['loss']:>9.4f}" if r["layer"] == load["layers"][0] else " " * 14
        lines.append(
            f"{head}{r['layer']:>7}{r['max_over_mean']:>10.3f}{r['min_over_mean']:>10.3f}"
            f"{r['dropped_frac']:>9.4f}{r['aux_loss']:>10.4f}   {r['counts']}"
        )
    return [*lines, "(aux loss = E * sum_e f_e * m_e: 1.0 for perfectly balanced routing)"]


def format_table(s: dict) -> str:
    return "\n".join([*_dispatch_lines(s), *_load_lines(s)])


def csv_rows(s: dict) -> list[dict]:
    """One row per dispatcher and rank."""
    keys = ("ep", "experts", "top_k", "capacity_factor", "tokens", "d_model", "dtype", "steps", "warmup")
    return [
        {k: s["config"][k] for k in keys}
        | {
            "d_ff": s["d_ff"],
            "dispatcher": name,
            "rank": rank,
            "median_s": r["median_s"],
            "slowest_rank_median_s": impl["median_s"],
            "bytes_sent": r["measured_bytes"],
            "analytic_bytes": r["analytic_bytes"],
            "formulas_bytes": s["formulas_step"] if name == "alltoall" else None,
        }
        for name, impl in s["impls"].items()
        for rank, r in enumerate(impl["ranks"])
    ]


def add_arguments(p) -> None:
    p.add_argument("--experts", type=int, default=8, help="model.moe.num_experts")
    p.add_argument("--top-k", type=int, default=2, help="model.moe.top_k")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="model.moe.capacity_factor")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank in the dispatch comparison")
    p.add_argument("--d-ff", type=int, default=None, help="expert width (default: the Llama rule)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dispatch comparison")
    p.add_argument("--train-steps", type=int, default=40, help="Trainer steps for the load report (0: none)")
    p.add_argument("--load-csv", default=None, help="also write the load metrics of every step to this file")


def check(p, args) -> None:
    if args.tokens < 1 or args.train_steps < 0:
        p.error("--tokens must be at least 1 and --train-steps at least 0")
    if args.experts >= 1 and expert_capacity(args.capacity_factor, args.tokens, args.top_k, args.experts) < 1:
        p.error(
            f"--capacity-factor {args.capacity_factor} leaves the experts no room for {args.tokens} tokens"
        )


parse_args, run_benchmark, _ = harness.commands(
    __name__,
    "MoE dispatch, our all-to-all against an all-gather dispatcher; expert load in training",
    "--ep",
    "expert parallelism",
    steps=10,
    warmup=2,
    model={"n_layers": 2, "seq_len": 64, "batch": ("--micro-batch", 4, "rows per rank per training step")},
)


def run(argv=None) -> dict:
    """The benchmark's run, then with --load-csv the load metrics of every training step."""
    summary = run_benchmark(argv)
    if summary["config"]["load_csv"] and summary["load"]["steps"]:
        rows = [
            {k: v for k, v in r.items() if k != "counts"}
            | {f"expert{e}": n for e, n in enumerate(r["counts"])}
            for r in summary["load"]["rows"]
        ]
        report.write_csv(summary["config"]["load_csv"], rows)
    return summary


def main(argv=None) -> int:
    return harness.exit_status(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

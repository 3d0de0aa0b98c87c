"""The collectives of data parallelism and ZeRO, timed over Gloo on CPU ranks in each form torch offers
(`python -m dtrain.bench.collectives [--ranks 2] [--mib 32] [--steps 15]`).

Gloo has no reduce-scatter or all-gather algorithm of its own for a flat tensor: the flat reduce-scatter
clones its whole input, all-reduces the clone and copies this rank's part out; the list form all-reduces
each rank's part (cloning only the others'); all-gather fills a fresh buffer and copies it out. So on this
backend the collectives ZeRO needs cost more than the all-reduce of torch's DDP and the in-place
broadcasts from each rank of ZeroRedundancyOptimizer, which move the same bytes. parallel.exchange sends
each rank's part straight to the others instead (the same bytes again), which is what
parallel.collectives' all_gather_flat and reduce_scatter_flat do over Gloo. Each round times every form
once, in turn, after a barrier (a form lasts as long as its slowest rank); the table gives the median
over the rounds and its ratio to the all-reduce, then checks that every reduce-scatter form gave the same
sums and every gather the same parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from dtrain.bench import harness
from parallel.collectives import (
    all_gather_flat,
    all_gather_single,
    reduce_scatter_flat,
    reduce_scatter_single,
)


def _broadcasts(full: torch.Tensor, n: int) -> None:
    works = [dist.broadcast(part, src=s, async_op=True) for s, part in enumerate(full.chunk(n))]
    for work in works:
        work.wait()


# name -> (what issues it, what it leaves: "sum" (the whole sum in `full`), "part" (this rank's part of it
# in `out`) or "gathered" (every rank's own part in `full`), the call on `full`, `out`, the group size n and
# this rank r).
FORMS = {
    "all-reduce": ("torch DDP", "sum", lambda full, out, n, r: dist.all_reduce(full)),
    "reduce-scatter, flat form": ("", "part", lambda full, out, n, r: reduce_scatter_single(out, full)),
    "reduce-scatter, list form": (
        "",
        "part",
        lambda full, out, n, r: dist.reduce_scatter(out, list(full.chunk(n))),
    ),
    "reduce-scatter, exchange": ("dtrain", "part", lambda full, out, n, r: reduce_scatter_flat(out, full)),
    "all-gather, flat form": (
        "",
        "gathered",
        lambda full, out, n, r: all_gather_single(full, full.chunk(n)[r]),
    ),
    "all-gather, list form": (
        "",
        "gathered",
        lambda full, out, n, r: dist.all_gather(list(full.chunk(n)), full.chunk(n)[r]),
    ),
    "all-gather, exchange": (
        "dtrain",
        "gathered",
        lambda full, out, n, r: all_gather_flat(full, full.chunk(n)[r]),
    ),
    "broadcast from each rank": (
        "ZeroRedundancyOptimizer",
        "gathered",
        lambda full, out, n, r: _broadcasts(full, n),
    ),
}


def measure(rank: int, args) -> dict:
    n = dist.get_world_size()
    numel = args.mib * 2**20 // 4 // n * n
    # Small integers: every sum is exact in any order, so the forms' results compare bitwise.
    every = [
        torch.randint(-8, 9, (numel,), generator=torch.Generator().manual_seed(s)).float() for s in range(n)
    ]
    data, full, out = every[rank], every[rank].clone(), torch.empty(numel // n)
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for step in range(args.warmup + args.steps):
        harness.say(rank, f"[bench] round {step + 1}/{args.warmup + args.steps}")
        for name, (_, _, call) in FORMS.items():
            full.copy_(data)
            dist.barrier()
            started = time.perf_counter()
            call(full, out, n, rank)
            elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
            if step >= args.warmup:
                times[name].append(float(elapsed))
    summed = sum(every)
    want = {
        "sum": summed,
        "part": summed.chunk(n)[rank],
        "gathered": torch.cat([every[s].chunk(n)[s] for s in range(n)]),
    }
    agree = True
    for _, result, call in FORMS.values():
        full.copy_(data)
        call(full, out, n, rank)
        agree &= torch.equal(out if result == "part" else full, want[result])
    return {
        "ranks": n,
        "bytes": numel * 4,
        "median_ms": {name: 1000 * statistics.median(t) for name, t in times.items()},
        "agree": bool(harness.gather(agree, n) == [True] * n),
    }


def format_table(s: dict) -> str:
    base = s["median_ms"]["all-reduce"]
    lines = [
        *harness.banner(
            "Gloo collectives", s["ranks"], f"a flat fp32 tensor of {s['bytes'] / 2**20:.1f} MiB"
        ),
        f"{'collective':28} {'issued by':24} {'median ms':>10} {'/ all-reduce':>13}",
    ]
    for name, (who, _, _) in FORMS.items():
        ms = s["median_ms"][name]
        lines.append(f"{name:28} {who:24} {ms:10.2f} {ms / base:13.2f}")
    lines.append("results: " + ("every form gave the same sums and parameters" if s["agree"] else "DIFFER"))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.collectives", description=__doc__.splitlines()[0]
    )
    p.add_argument("--ranks", type=int, default=2, help="Gloo ranks (processes spawned)")
    p.add_argument(
        "--mib", type=int, default=32, help="size of the full tensor (about one model's gradients)"
    )
    p.add_argument("--steps", type=int, default=15, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before them")
    p.add_argument("--timeout", type=float, default=300.0, help="Gloo timeout (s)")
    args = p.parse_args(argv)
    if args.ranks < 2 or args.mib < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--ranks must be at least 2, --mib and --steps at least 1, --warmup at least 0")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    summary, _attempts = harness.spawn(measure, args, args.ranks, args.timeout)
    print(format_table(summary), flush=True)
    return summary


if __name__ == "__main__":
    run()

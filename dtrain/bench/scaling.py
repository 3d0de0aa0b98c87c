"""Scaling benchmarks: throughput, per-rank memory and bytes communicated across world sizes and layouts,
strong and weak scaling (`dtrain bench`, or `python -m dtrain.bench.scaling`).

    dtrain bench CONFIG [key=value ...] [--worlds 1,2,4] [--layouts dp,tp2,pp2,zero1,zero3,ep2]
        [--mode strong|weak|both] [--steps 5] [--warmup 2] [--global-batch B] [--rank-batch R] [--out DIR]
        [--threads N] [--timeout S]

A layout is `dp` or parts joined by `+`: tpN, ppN, epN, zeroN, sp (tp2+sp, pp2+zero1, ...); data
parallelism takes the ranks the others leave. epN makes a dense config a mixture of experts (num_experts =
the least multiple of N >= 4). A layout runs at every world of the sweep it fits; fitting none is an error.

Every point (mode, layout, world) runs in a fresh world (harness.spawn): on CPU peak memory is the
process's peak resident set, which never goes down. Each rank builds the real Trainer (harness.contest):
step 0 counts the bytes this rank sends (parallel.ledger.CommLedger, training traffic per grid axis, as the
trainer's comm/total_bytes) next to dtrain.analysis.comm_volume's prediction, and Trainer.held_bytes(); then
`warmup` untimed and `steps` timed steps (the median of the slowest rank); then every rank's peak memory.

Strong scaling keeps the global batch (--global-batch, default train.global_batch_size); weak scaling the
rows per data-parallel rank (--rank-batch, same default: both modes start from the same batch at dp 1).
Efficiency against the layout's smallest world n0: (tokens/s at n / n) / (tokens/s at n0 / n0). Written
under --out: scaling.csv, throughput.png, memory.png and comm.png (without matplotlib: a note), and
TensorBoard scalars tagged <mode>/<metric>/<layout> over the world size.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

from dtrain.bench import harness, report
from dtrain.config import ConfigError

DEFAULT_LAYOUTS = "dp,tp2,pp2,zero1,zero3,ep2"
MODES = ("strong", "weak")
AXES = ("dp", "tp", "pp", "ep", "edp")  # the ledger's grid axes with a column each; the rest is "other"
OWNED = ("dp", "tp", "pp", "ep", "zero", "sp")  # parallel.* keys a layout sets
_PART = re.compile(r"(tp|pp|ep|zero)(\d+)|sp")
SYNTAX = "a layout is dp, or parts tpN, ppN, epN, zeroN (0-3), sp joined by + (e.g. tp2+zero1)"
MIB = report.MIB
COLUMNS = [
    "mode", "layout", "world", "dp", "tp", "pp", "ep", "zero", "sp", "global_batch", "tokens_per_step",
    "steps_timed", "step_ms_median", "step_ms_mean", "tokens_per_s", "tokens_per_s_per_rank", "base_world",
    "speedup", "efficiency", "model_gflops_per_s", "held_params_bytes", "held_grads_bytes",
    "held_optimizer_bytes", "held_host_bytes", "held_total_bytes", "peak_mem_bytes", "sent_bytes_mean",
    "sent_bytes_max", *[f"sent_{a}_bytes" for a in (*AXES, "other")], "sent_predicted_bytes", "first_loss",
    "n_params", "threads_per_rank", "attempts",
]  # fmt: skip
# file -> panels (column, y label, divisor): one row of panels per column, one column per mode
FIGURES = {
    "throughput.png": [
        ("tokens_per_s", "tokens/s (global)", 1),
        ("efficiency", "efficiency vs smallest world", 1),
    ],
    "memory.png": [
        ("held_total_bytes", "model states, MiB per rank (max)", MIB),
        ("peak_mem_bytes", "peak memory, MiB per rank (max)", MIB),
    ],
    "comm.png": [("sent_bytes_mean", "MiB sent per rank per step (mean)", MIB)],
}
SCALARS = {  # TensorBoard metric -> (column, divisor)
    "tokens_per_s": ("tokens_per_s", 1),
    "efficiency": ("efficiency", 1),
    "step_ms": ("step_ms_median", 1),
    "model_states_mib": ("held_total_bytes", MIB),
    "peak_mem_mib": ("peak_mem_bytes", MIB),
    "sent_mib_per_step": ("sent_bytes_mean", MIB),
}


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    ep: int = 0  # 0: no experts asked for; N >= 1: MoE with experts spread over N data-parallel ranks
    zero: int = 0
    sp: bool = False

    def misfit(self, world: int) -> str | None:
        """Why this layout cannot run on `world` ranks, or None."""
        if world % (self.tp * self.pp):
            return f"tp*pp={self.tp * self.pp} does not divide it"
        if self.ep > 1 and (world // (self.tp * self.pp)) % self.ep:
            return f"ep={self.ep} does not divide dp={world // (self.tp * self.pp)}"
        return None

    def overrides(self, world: int, experts: int) -> list[str]:
        out = [
            f"parallel.dp={world // (self.tp * self.pp)}",
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.ep={max(1, self.ep)}",
            f"parallel.zero={self.zero}",
            f"parallel.sp={str(self.sp).lower()}",
        ]
        if self.ep and not experts:
            out.append(f"model.moe.num_experts={self.ep * -(-4 // self.ep)}")
        return out


def parse_layout(name: str) -> Layout:
    """`dp` or +-joined parts, into a Layout; anything else is a ConfigError naming what to change."""
    if name == "dp":
        return Layout(name)
    values: dict = {}
    for part in name.split("+"):
        if part == "dp":  # data parallelism is implied: dp+zero1 is zero1
            continue
        m = _PART.fullmatch(part)
        key = "sp" if part == "sp" else m.group(1) if m else None
        if key is None or key in values:
            why = "repeats a part" if key else f"has an unknown part {part!r}"
            raise ConfigError(f"--layouts: {name!r} {why}; {SYNTAX}")
        values[key] = True if key == "sp" else int(m.group(2))
    if values.get("zero", 0) > 3 or any(values.get(k, 1) < 1 for k in ("tp", "pp", "ep")):
        raise ConfigError(f"--layouts: {name!r}: tpN, ppN and epN need N >= 1 and zeroN N in 0-3")
    if values.get("sp") and values.get("tp", 1) < 2:
        raise ConfigError(f"--layouts: {name!r}: sp rides on tensor parallelism; add tpN with N >= 2")
    return Layout(name, **values)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 1,2,4")
    return sorted(set(values))


@dataclass
class Point:
    mode: str
    layout: Layout
    world: int
    global_batch: int
    cfg: object  # the validated dtrain Config

    @property
    def key(self) -> tuple:  # points with the same key train the same thing: measured once
        return (self.layout.name, self.world, self.global_batch)


def plan(args) -> tuple[list[Point], list[str]]:
    """Every point of the sweep with its validated config, and a note per (layout, world) left out because
    the layout does not fit. Raises ConfigError (one line) before any process starts."""
    from dtrain.config import load_config
    from dtrain.validation import validate

    for item in args.overrides:
        key = item.split("=", 1)[0]
        if key.startswith("parallel.") and key.split(".", 1)[1] in OWNED:
            raise ConfigError(f"{item}: the layout sets {key}; choose layouts with --layouts ({SYNTAX})")
    base = load_config(args.config, args.overrides)
    worlds = _int_list(args.worlds, "--worlds")
    layouts = [parse_layout(x.strip()) for x in args.layouts.split(",") if x.strip()]
    if not layouts:
        raise ConfigError(f"--layouts {args.layouts!r}: name at least one layout; {SYNTAX}")
    modes = MODES if args.mode == "both" else (args.mode,)
    g = args.global_batch or base.train.global_batch_size
    r = args.rank_batch or base.train.global_batch_size
    if g < 1 or r < 1:
        raise ConfigError("--global-batch and --rank-batch must be at least 1")
    if args.steps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--steps and --threads must be at least 1 and --warmup at least 0")
    points, notes = [], []
    for layout in layouts:
        fits = [w for w in worlds if layout.misfit(w) is None]
        if not fits:
            why = "; ".join(f"world {w}: {layout.misfit(w)}" for w in worlds)
            raise ConfigError(
                f"--layouts {layout.name} fits none of --worlds {args.worlds} ({why}); change the layout or "
                f"add a world it fits"
            )
        notes += [f"{layout.name} skipped at world {w}: {layout.misfit(w)}" for w in worlds if w not in fits]
        for mode in modes:
            for w in fits:
                dp = w // (layout.tp * layout.pp)
                batch = g if mode == "strong" else r * dp
                overrides = [
                    *args.overrides,
                    *layout.overrides(w, base.model.moe.num_experts),
                    f"train.global_batch_size={batch}",
                    f"train.steps={1 + args.warmup + args.steps}",
                    "train.eval_batches=0",
                ]
                try:
                    cfg = validate(load_config(args.config, overrides), w)
                except ConfigError as e:
                    raise ConfigError(f"{layout.name} at world {w} ({mode} scaling): {e}") from None
                points.append(Point(mode, layout, w, batch, cfg))
    return points, notes


def _sent(ledger) -> dict[str, float]:
    """Bytes the ledger saw this rank send: the total, and per axis of AXES and "other"."""
    per = dict.fromkeys((*AXES, "other"), Fraction(0))
    for (axis, _op), tally in ledger.tallies().items():
        per[axis if axis in per else "other"] += tally.sent
    return {"total": float(ledger.total_bytes())} | {axis: float(v) for axis, v in per.items()}


def _predicted(cfg, rank: int) -> float:
    """dtrain.analysis.comm_volume's bytes for this rank's step; NaN where it does not model the layout."""
    from dtrain.analysis.comm_volume import NotModelled, predict

    try:
        return float(predict(cfg, rank).total_bytes())
    except NotModelled:
        return float("nan")


def count_step(impl: harness.TrainerSide, index: int) -> tuple[float, dict]:
    from parallel.ledger import CommLedger

    with CommLedger(impl.trainer.grid) as ledger:
        impl.trainer.ledger = ledger  # the trainer tallies its metrics-only reductions apart
        loss = impl.step(index)
    impl.trainer.ledger = None
    return loss, {"sent": _sent(ledger), "held": impl.trainer.held_bytes()}


def measure(rank: int, job) -> dict:
    """One point, on every rank of a fresh world; returns every rank's figures."""
    import torch

    from dtrain.model import count_params
    from dtrain.runtime import peak_memory_bytes
    from parallel.grid import ProcessGrid

    if job.threads:
        torch.set_num_threads(job.threads)
    cfg, p = job.cfg, job.cfg.parallel
    grid = ProcessGrid(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep, dp_shard=p.dp_shard)
    builders = {"dtrain": lambda: harness.TrainerSide(cfg, grid)}
    done = harness.contest(
        rank, builders, {"dtrain": "dtrain"}, job.warmup, job.steps, count_step, prefix=f"{job.label}: "
    )
    if done.errors:
        raise RuntimeError(f"{job.label}: {done.errors['dtrain']}")
    counted, step_s = done.counted["dtrain"][0], done.step_times("dtrain")
    threads = torch.get_num_threads()
    median_ms = 1e3 * statistics.median(step_s)
    harness.say(rank, f"[bench] {job.label}: median step {median_ms:.1f} ms, {threads} threads per rank")
    mine = counted | {"predicted": _predicted(cfg, grid.rank), "peak": peak_memory_bytes(torch.device("cpu"))}
    return {
        "loss": done.losses["dtrain"][0],
        "step_s": step_s,
        "per_rank": harness.gather(mine, grid.world_size),
        "n_params": count_params(cfg.model)["total"],
        "flops_per_token": done.impls["dtrain"].trainer.flops_per_token,
        "threads": threads,
    }


def _row(pt: Point, r: dict) -> dict:
    """One point's row of the table and the CSV; per rank: the maximum of bytes held and peak memory, the
    mean of bytes sent."""
    ranks, median = r["per_rank"], statistics.median(r["step_s"])
    tokens = pt.global_batch * pt.cfg.train.seq_len

    def held_max(keep) -> float:  # the rank holding most of what `keep(where, what)` selects
        return max(
            sum(v for where, d in rank["held"].items() for what, v in d.items() if keep(where, what))
            for rank in ranks
        )

    row = {"mode": pt.mode, "layout": pt.layout.name, "world": pt.world}
    row |= {k: getattr(pt.cfg.parallel, k) for k in ("dp", "tp", "pp", "ep", "zero", "sp")}
    row |= {"global_batch": pt.global_batch, "tokens_per_step": tokens, "steps_timed": len(r["step_s"])}
    row |= {"step_ms_median": 1e3 * median, "step_ms_mean": 1e3 * statistics.fmean(r["step_s"])}
    row |= {"tokens_per_s": tokens / median, "tokens_per_s_per_rank": tokens / median / pt.world}
    row["model_gflops_per_s"] = r["flops_per_token"] * tokens / median / 1e9
    for what in ("params", "grads", "optimizer"):
        row[f"held_{what}_bytes"] = held_max(lambda where, kind, what=what: kind == what)
    row["held_host_bytes"] = held_max(lambda where, kind: where == "host")
    row["held_total_bytes"] = held_max(lambda where, kind: True)
    row["peak_mem_bytes"] = max(rank["peak"] for rank in ranks)
    row["sent_bytes_mean"] = statistics.fmean(rank["sent"]["total"] for rank in ranks)
    row["sent_bytes_max"] = max(rank["sent"]["total"] for rank in ranks)
    row |= {
        f"sent_{axis}_bytes": statistics.fmean(rank["sent"][axis] for rank in ranks)
        for axis in (*AXES, "other")
    }
    row["sent_predicted_bytes"] = statistics.fmean(rank["predicted"] for rank in ranks)
    keep = {"first_loss": r["loss"], "n_params": r["n_params"], "threads_per_rank": r["threads"]}
    return row | keep | {"attempts": r["attempts"]}


def rows_of(points: list, measured: dict) -> list[dict]:
    """One row per point, ordered by mode, layout (as asked) and world, with speedup and efficiency against
    the smallest world of the same mode and layout."""
    order = {name: i for i, name in enumerate(dict.fromkeys(pt.layout.name for pt in points))}
    rows = sorted(
        (_row(pt, measured[pt.key]) for pt in points),
        key=lambda r: (MODES.index(r["mode"]), order[r["layout"]], r["world"]),
    )
    for row in rows:
        base = min((r for r in rows if (r["mode"], r["layout"]) == (row["mode"], row["layout"])),
                   key=lambda r: r["world"])  # fmt: skip
        row["base_world"] = base["world"]
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["efficiency"] = row["speedup"] * base["world"] / row["world"]
    return rows


def format_table(rows: list[dict]) -> str:
    r0, w, mib = rows[0], max(12, 2 + max(len(r["layout"]) for r in rows)), report.mib
    head = (
        f"{'mode':<7}{'layout':<{w}}{'world':>6}  {'dp x tp x pp':<13}{'batch':>6}{'step ms':>9}"
        f"{'tokens/s':>10}{'eff':>6}{'states MiB':>11}{'peak MiB':>10}{'sent MiB':>10}{'predicted':>10}"
        f"{'loss':>8}"
    )
    sizes = {r["layout"]: f"{r['n_params'] / 1e6:.2f}M parameters" for r in rows}
    models = [f"{v} ({', '.join(k for k in sizes if sizes[k] == v)})" for v in dict.fromkeys(sizes.values())]
    model = models[0].split(" (")[0] if len(models) == 1 else ", ".join(models)
    lines = [
        f"scaling: {model}, {r0['tokens_per_step'] // r0['global_batch']} tokens per row, "
        f"{r0['steps_timed']} timed steps per point (median, slowest rank); per rank: model states (max), "
        f"peak memory (max), MiB sent per step (mean; measured by the ledger, predicted by comm_volume)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        grid = f"{r['dp']} x {r['tp']} x {r['pp']}"
        lines.append(
            f"{r['mode']:<7}{r['layout']:<{w}}{r['world']:>6}  {grid:<13}{r['global_batch']:>6}"
            f"{r['step_ms_median']:>9.1f}{r['tokens_per_s']:>10.0f}{r['efficiency']:>6.2f}"
            f"{mib(r['held_total_bytes'], 2):>11}{mib(r['peak_mem_bytes'], 1):>10}"
            f"{mib(r['sent_bytes_mean']):>10}{mib(r['sent_predicted_bytes']):>10}{r['first_loss']:>8.4f}"
        )
    return "\n".join(lines)


def run_sweep(args) -> list[dict]:
    """Plans (a bad sweep fails here, in one line), measures every distinct point in its own world, then
    prints the table and writes the CSV, the plots and the TensorBoard scalars under --out."""
    points, notes = plan(args)
    for note in notes:
        print(f"[bench] {note}", flush=True)
    measured: dict[tuple, dict] = {}
    for i, pt in enumerate(points):
        if pt.key not in measured:
            label = f"{pt.layout.name} at world {pt.world}, global batch {pt.global_batch}"
            print(f"[bench] point {i + 1}/{len(points)}: {pt.mode} scaling, {label}", flush=True)
            job = SimpleNamespace(
                cfg=pt.cfg, warmup=args.warmup, steps=args.steps, threads=args.threads, label=label
            )
            raw, attempts = harness.spawn(measure, job, pt.world, args.timeout)
            measured[pt.key] = raw | {"attempts": attempts}
    rows = rows_of(points, measured)
    os.makedirs(args.out, exist_ok=True)
    print(format_table(rows), flush=True)
    report.write_csv(os.path.join(args.out, "scaling.csv"), [{c: r[c] for c in COLUMNS} for r in rows])
    shape = {"x": "world", "line": "layout", "facet": "mode"}
    plots = report.write_plots(rows, args.out, FIGURES, **shape)
    report.write_scalars(rows, args.out, SCALARS, **shape)
    print(f"[bench] wrote {', '.join(plots) or 'no plots'} and TensorBoard scalars in {args.out}", flush=True)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `dtrain bench` and `python -m dtrain.bench.scaling`."""
    layouts = (
        f"comma-separated layouts (default {DEFAULT_LAYOUTS}); {SYNTAX}; dp takes the ranks tp*pp leave; epN "
        "makes a dense config a mixture of experts (model.moe.num_experts = the least multiple of N >= 4); "
        "each layout runs at the worlds it fits"
    )
    mode = "strong: fixed global batch; weak: fixed rows per data-parallel rank; both (default)"
    add = p.add_argument
    add("config", help="YAML config, e.g. configs/tiny.yaml (its parallel.* layout keys are replaced)")
    add(
        "overrides", nargs="*", help="dotted config overrides, e.g. model.d_model=128 (parallel.*: --layouts)"
    )
    add("--mode", choices=("strong", "weak", "both"), default="both", help=mode)
    add("--worlds", default="1,2,4", help="comma-separated world sizes to sweep (default 1,2,4)")
    add("--layouts", default=DEFAULT_LAYOUTS, help=layouts)
    add("--steps", type=int, default=5, help="timed steps per point (default 5; the median counts)")
    add("--warmup", type=int, default=2, help="untimed steps per point after the counted one (default 2)")
    add("--global-batch", type=int, help="strong scaling: rows per step (default train.global_batch_size)")
    add("--rank-batch", type=int, help="weak scaling: rows per dp rank (default train.global_batch_size)")
    add("--out", default="runs/bench", help="folder for scaling.csv, PNGs, TensorBoard (default runs/bench)")
    add("--threads", type=int, help="torch threads per rank (default: the machine's cores / the world size)")
    add("--timeout", type=float, default=300.0, help="Gloo collective timeout in seconds (default 300)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dtrain.bench.scaling", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return harness.exit_status(lambda argv: run_sweep(parse_args(argv)), argv)


if __name__ == "__main__":
    raise SystemExit(main())

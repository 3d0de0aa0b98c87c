"""Scaling benchmarks: throughput, per-rank memory and bytes communicated across world sizes and layouts,
strong and weak scaling (`dtrain bench`, or `python -m dtrain.bench.scaling`).

    dtrain bench CONFIG [key=value ...] [--worlds 1,2,4] [--layouts dp,tp2,pp2,zero1,zero3,ep2]
        [--mode strong|weak|both] [--steps 5] [--warmup 2] [--global-batch B] [--rank-batch R] [--out DIR]
        [--threads N] [--timeout S]

A layout is `dp` (plain data parallelism) or parts joined by `+`: tpN, ppN, epN, zeroN, sp (tp2+sp,
pp2+zero1, ...); data parallelism takes the ranks the others leave (dp = world / (tp * pp)). epN turns a
dense config into a mixture of experts (model.moe.num_experts = the smallest multiple of N that is at least
4) unless the config has experts already. A layout runs at every world of the sweep it fits, and fitting
none is an error.

Every point (mode, layout, world) runs in a fresh spawned Gloo world (dtrain.bench.world): fresh, because on
CPU peak memory is the process's peak resident set, which never goes down. Each rank builds the real
Trainer from the config with the layout's parallel.* keys and runs:

  step 1, counted  the bytes this rank sends, from the communication ledger (parallel.ledger.CommLedger:
                   the training traffic per grid axis, without the reductions that only feed metrics, as
                   the trainer's comm/total_bytes), next to dtrain.comm_volume's prediction from the config
                   (MoE all-to-alls at the balanced figure); and Trainer.held_bytes(), the parameters,
                   gradients and optimizer states the rank holds.
  warm-up, timed   `warmup` untimed steps, then `steps` timed ones, each started after a barrier; a step
                   lasts as long as its slowest rank, and the figure is the median.
  peak memory      dtrain.runtime.peak_memory_bytes of every rank after the last step.

Strong scaling keeps the global batch (--global-batch, default train.global_batch_size); weak scaling keeps
the rows per data-parallel rank (--rank-batch, default train.global_batch_size, so both modes start from the
same batch at dp 1) and trains on rank-batch x dp rows. Efficiency, per layout and relative to the smallest
world n0 it ran at: (tokens/s at n / n) / (tokens/s at n0 / n0), which for strong scaling is
n0 T(n0) / (n T(n)) and for weak scaling the throughput per rank.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

from dtrain.config import ConfigError

DEFAULT_LAYOUTS = "dp,tp2,pp2,zero1,zero3,ep2"
MODES = ("strong", "weak")
AXES = ("dp", "tp", "pp", "ep", "edp")  # the ledger's grid axes with a column each; the rest is "other"
HELD = [(where, what) for where in ("device", "host") for what in ("params", "grads", "optimizer")]
OWNED = ("dp", "tp", "pp", "ep", "zero", "sp")  # parallel.* keys a layout sets
_PART = re.compile(r"(tp|pp|ep|zero)(\d+)|sp")
SYNTAX = "a layout is dp, or parts tpN, ppN, epN, zeroN (0-3), sp joined by + (e.g. tp2+zero1)"


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
    from dtrain.config import load_config, validate

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


def _sent(ledger) -> list[float]:
    """Bytes the ledger saw this rank send: the total, then per axis of AXES and "other"."""
    per = dict.fromkeys((*AXES, "other"), Fraction(0))
    for (axis, _op), tally in ledger.tallies().items():
        per[axis if axis in per else "other"] += tally.sent
    return [float(ledger.total_bytes()), *[float(v) for v in per.values()]]


def _predicted(cfg, rank: int) -> float:
    """dtrain.comm_volume's bytes for this rank's step; NaN where it does not model the layout."""
    from dtrain.comm_volume import NotModelled, predict

    try:
        return float(predict(cfg, rank).total_bytes())
    except NotModelled:
        return float("nan")


def measure(rank: int, job) -> dict:
    """One point, on every rank of a fresh world; returns rank 0's view of every rank's figures."""
    import torch

    from dtrain.bench.timing import after_barrier, slowest
    from dtrain.bench.world import gather, say
    from dtrain.model import count_params
    from dtrain.runtime import peak_memory_bytes
    from dtrain.trainer import Trainer
    from parallel.grid import ProcessGrid
    from parallel.ledger import CommLedger

    if job.threads:
        torch.set_num_threads(job.threads)
    cfg, p, device = job.cfg, job.cfg.parallel, torch.device("cpu")
    grid = ProcessGrid(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep)
    trainer = Trainer(cfg, grid, device)
    with CommLedger(grid) as ledger:
        trainer.ledger = ledger  # the trainer tallies its metrics-only reductions apart
        loss = trainer.train_step().loss
    trainer.ledger = None
    held = trainer.held_bytes()
    times = []
    for i in range(job.warmup + job.steps):
        _, started, ended = after_barrier(trainer.train_step)
        if i >= job.warmup:
            times.append(ended - started)
    step_s = slowest(times)
    median_ms = 1e3 * sorted(step_s)[len(step_s) // 2]
    say(
        rank,
        f"[bench] {job.label}: median step {median_ms:.1f} ms, {torch.get_num_threads()} threads per rank",
    )
    mine = [
        *_sent(ledger),
        _predicted(cfg, grid.rank),
        *(float(held[w][k]) for w, k in HELD),
        float(peak_memory_bytes(device)),
    ]
    return {
        "loss": loss,
        "step_s": step_s,
        "per_rank": gather(mine, grid.world_size),
        "n_params": count_params(cfg.model)["total"],
        "flops_per_token": trainer.flops_per_token,
        "threads": torch.get_num_threads(),
    }


def run_sweep(args) -> list[dict]:
    """Plans (a bad sweep fails here, in one line), measures every distinct point in its own world, then
    prints the table and writes the CSV, the plots and the TensorBoard scalars under --out."""
    from torch.multiprocessing.spawn import ProcessException

    from dtrain.bench import scaling_report as report
    from dtrain.bench.world import spawn

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
            for attempt in (1, 2):  # a world that dies (a rank aborting under load) runs once more, fresh
                try:
                    measured[pt.key] = spawn(measure, job, pt.world, args.timeout) | {"attempts": attempt}
                    break
                except ProcessException as e:
                    if attempt == 2:
                        raise
                    print(f"[bench] {label}: {e}; measuring it again in a fresh world", flush=True)
    rows = report.rows_of(points, measured)
    return report.publish(rows, args.out)


FLAGS = [  # (flag, type, default, help) of `dtrain bench` after CONFIG and the overrides; --mode aside
    ("--worlds", str, "1,2,4", "comma-separated world sizes to sweep (default 1,2,4)"),
    (
        "--layouts",
        str,
        DEFAULT_LAYOUTS,
        f"comma-separated layouts (default {DEFAULT_LAYOUTS}); {SYNTAX}; dp takes the ranks tp*pp leave; "
        "epN makes a dense config a mixture of experts (model.moe.num_experts = the least multiple of "
        "N >= 4); each layout runs at the worlds it fits",
    ),
    ("--steps", int, 5, "timed steps per point (default 5; the median counts)"),
    ("--warmup", int, 2, "untimed steps per point after the counted one (default 2)"),
    ("--global-batch", int, None, "strong scaling: rows per step (default train.global_batch_size)"),
    (
        "--rank-batch",
        int,
        None,
        "weak scaling: rows per data-parallel rank (default train.global_batch_size)",
    ),
    (
        "--out",
        str,
        "runs/bench",
        "folder for scaling.csv, the PNGs and TensorBoard scalars (default runs/bench)",
    ),
    ("--threads", int, None, "torch threads per rank (default: the machine's cores / the world size)"),
    ("--timeout", float, 300.0, "Gloo collective timeout in seconds (default 300)"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", help="YAML config, e.g. configs/tiny.yaml (its parallel.* layout keys are replaced)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides, e.g. model.d_model=128 (parallel.dp/tp/pp/ep/zero/sp: use --layouts)",
    )
    p.add_argument(
        "--mode",
        choices=("strong", "weak", "both"),
        default="both",
        help="strong: fixed global batch; weak: fixed rows per data-parallel rank; both (default)",
    )
    for flag, kind, default, help_ in FLAGS:
        p.add_argument(flag, type=kind, default=default, help=help_)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dtrain.bench.scaling", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        run_sweep(parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

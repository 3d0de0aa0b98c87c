"""Pipeline timelines: which rank runs which action when, drawn as ranks x time (`dtrain schedule`).

A timeline is a list of `(rank, action, start, end)`, the form `pipeline_schedules.simulate` returns:
`rank` is the pipeline stage, `action` a `pipeline_schedules.Action`. It comes either from the schedule
data on an idealised machine (`from_simulation`: a forward takes 1 unit, a backward 2, no communication)
or from a real step (`measure`: a short Gloo run on this machine whose executor records
time.perf_counter() around each action's compute; `load_measured` reads what it wrote back). `draw`
turns either into a PNG or SVG: one row per rank, forwards and backwards in two colours, the chunk shown
as a shade and `chunk.microbatch` inside each box where it fits, idle time (the bubble) left white.

The bubble is the idle share of the step: 1 - busy / step, per rank. On the idealised machine it is
(p-1)/(m+p-1) for GPipe and 1F1B; interleaved 1F1B with v chunks per rank has bubble over ideal time
(p-1)/(v*m) (docs/formulas.md), an idle share of (p-1)/(v*m+p-1).
"""

from __future__ import annotations

import json
import os
import queue
import time
from datetime import timedelta

from dtrain.runtime import free_port
from parallel import pipeline_schedules
from parallel.pipeline_schedules import Action

MEASURED_FILE = "pipeline_timeline.json"
FORMATS = (".png", ".svg")

# Forwards blue, backwards orange; with v chunks per rank, chunk k of a rank (global chunk r + k * pp)
# is the k-th shade, darkest first.
FORWARD, BACKWARD = "#3b6fb6", "#e8823a"


class TimelineError(ValueError):
    """Something `dtrain schedule` cannot draw or measure; the message says what to do."""


# --- timelines ------------------------------------------------------------------------------------------


def from_simulation(name: str, pp: int, m: int, v: int = 1) -> list[tuple[int, Action, float, float]]:
    """The timeline of schedule `name` on the idealised machine (forward 1 unit, backward 2)."""
    return pipeline_schedules.simulate(pipeline_schedules.build(name, pp, m, v), pp)["timeline"]


def busy_per_rank(timeline, pp: int) -> list[float]:
    busy = [0.0] * pp
    for rank, _, start, end in timeline:
        busy[rank] += end - start
    return busy


def bubble_fraction(timeline, pp: int, steps: list[float] | None = None) -> float:
    """Idle share of the step over all ranks: 1 - busy / step, with each rank's step from `steps` (by
    default the whole timeline's span, as in pipeline_schedules.simulate)."""
    steps = steps or [max(end for _, _, _, end in timeline)] * pp
    return 1 - sum(busy_per_rank(timeline, pp)) / sum(steps)


def formula_bubble(name: str, pp: int, m: int, v: int = 1) -> float:
    """docs/formulas.md's bubble as an idle share of the step (the form `bubble_fraction` measures)."""
    if name == "interleaved":
        return (pp - 1) / (v * m + pp - 1)  # bubble over ideal time (p-1)/(v*m) = x  ->  x / (1 + x)
    return (pp - 1) / (m + pp - 1)


def bubble_report(name: str, pp: int, m: int, v: int, bubble: float, what: str = "simulated") -> str:
    """One line: this bubble next to docs/formulas.md's, in the form the formula is written in."""
    if name == "interleaved":
        over_ideal = bubble / (1 - bubble)
        return (
            f"{what} bubble: {bubble:.1%} of the step = {over_ideal:.1%} over the ideal time "
            f"(docs/formulas.md: (p-1)/(v*m) = {pp - 1}/{v * m} = {(pp - 1) / (v * m):.1%} over the ideal "
            "time)"
        )
    return (
        f"{what} bubble: {bubble:.1%} of the step "
        f"(docs/formulas.md: (p-1)/(m+p-1) = {pp - 1}/{m + pp - 1} = {formula_bubble(name, pp, m):.1%})"
    )


def load_measured(run_dir: str) -> list[tuple[int, Action, float, float]]:
    """The timeline `measure` wrote to `run_dir` (or the JSON file itself): seconds since the step's start
    on each rank, one row per pipeline stage."""
    data = _read_measured(run_dir)
    timeline = [
        (stage["stage"], Action(kind, chunk, mb), start, end)
        for stage in data["stages"]
        for kind, chunk, mb, start, end in stage["actions"]
    ]
    return sorted(timeline, key=lambda item: (item[2], item[0]))


def _read_measured(run_dir: str) -> dict:
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, MEASURED_FILE)
    if not os.path.isfile(path):
        raise TimelineError(
            f"{path} does not exist; write it with `dtrain schedule --measure CONFIG run.out_dir={run_dir}`"
        )
    with open(path) as f:
        return json.load(f)


# --- drawing --------------------------------------------------------------------------------------------


def _import_matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise TimelineError('drawing a timeline needs matplotlib: pip install -e ".[plot]"') from None
    return Figure, Patch, Rectangle


def _shade(hex_colour: str, k: int, v: int) -> tuple[float, float, float]:
    """Chunk k of v on a rank: the base colour, mixed with more white for later chunks."""
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    mix = 0.0 if v == 1 else 0.6 * k / (v - 1)
    return tuple(c + (1 - c) * mix for c in rgb)


def _text_colour(rgb) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "white" if luminance < 0.55 else "black"


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def check_out_path(out_path: str) -> None:
    if os.path.splitext(out_path)[1].lower() not in FORMATS:
        raise TimelineError(f"--out {out_path}: the timeline is drawn as .png or .svg")


def draw(
    timeline,
    pp: int,
    out_path: str,
    title: str,
    *,
    xlabel: str = "time (units of one chunk's forward; a backward takes 2)",
    steps: list[float] | None = None,
) -> str:
    """Draw `timeline` (ranks 0 .. pp-1 top to bottom) to `out_path`, PNG or SVG by its extension.

    The title gets the bubble fraction appended (per-rank step lengths from `steps`, else the span).
    Returns out_path."""
    check_out_path(out_path)
    ext = os.path.splitext(out_path)[1].lower()
    if not timeline:
        raise TimelineError("the timeline is empty: nothing ran")
    Figure, Patch, Rectangle = _import_matplotlib()

    n_chunks = 1 + max(a.chunk for _, a, _, _ in timeline)
    v = max(1, n_chunks // pp)
    span = max(steps or [max(end for _, _, _, end in timeline)])
    # Wide enough that a typical forward box holds its label (about 22 points), within sane bounds.
    forwards = sorted(end - start for _, a, start, end in timeline if a.kind == "F")
    typical = forwards[len(forwards) // 2] if forwards else span
    width = min(24.0, max(9.0, 1.5 + span / max(typical, span * 1e-3) * 22 / 72 / 0.86))
    height = 2.0 + 0.7 * pp
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    bubble = bubble_fraction(timeline, pp, steps)
    ax.set_title(f"{title}\nbubble (idle share of the step, white): {bubble:.1%}", fontsize=11)

    # Lanes: one per rank, white inside (idle), framed so the bubbles read as gaps in the lane.
    lane_ends = steps or [span] * pp
    for rank in range(pp):
        ax.add_patch(
            Rectangle((0, rank - 0.4), lane_ends[rank], 0.8, facecolor="white", edgecolor="#9a9a9a", lw=0.8)
        )
    axes_points = width * 72 * 0.86  # roughly the axes' share of the figure width, in points
    fontsize = 8
    for rank, a, start, end in timeline:
        k = a.chunk // pp
        face = _shade(FORWARD if a.kind == "F" else BACKWARD, k, v)
        edge = tuple(c * 0.55 for c in face)
        ax.add_patch(Rectangle((start, rank - 0.4), end - start, 0.8, facecolor=face, edgecolor=edge, lw=0.6))
        label = f"{a.chunk}.{a.microbatch}"
        if (end - start) / span * axes_points > 0.62 * fontsize * len(label) + 3:
            ax.text(
                (start + end) / 2,
                rank,
                label,
                ha="center",
                va="center",
                fontsize=fontsize,
                color=_text_colour(face),
            )

    ax.set_xlim(0, span * 1.005)
    ax.set_ylim(pp - 0.5, -0.5)  # rank 0 on top
    ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="x", color="#e6e6e6", lw=0.6)
    ax.set_axisbelow(True)

    handles = []
    for colour, what in ((FORWARD, "forward"), (BACKWARD, "backward")):
        for k in range(v):
            offset = "" if k == 0 else " + pp" if k == 1 else f" + {k}pp"
            which = f", {_ordinal(k + 1)} chunk of the rank (c = r{offset})" if v > 1 else ""
            handles.append(Patch(facecolor=_shade(colour, k, v), edgecolor="#555555", label=f"{what}{which}"))
    handles.append(Patch(facecolor="white", edgecolor="#9a9a9a", label="idle (bubble)"))
    fig.legend(
        handles=handles,
        title="box label: chunk.micro-batch (chunk c runs on rank r = c % pp)",
        loc="outside lower center",
        ncol=3 if v > 1 else len(handles),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, format=ext[1:])
    return out_path


def draw_simulation(name: str, pp: int, m: int, v: int, out_path: str) -> str:
    v = v if name == "interleaved" else 1
    title = f"{name} schedule, pp={pp}, m={m} micro-batches, v={v} (simulated: no communication cost)"
    return draw(from_simulation(name, pp, m, v), pp, out_path, title)


def draw_measured(run_dir: str, out_path: str) -> str:
    """Draw the timeline `measure` wrote to `run_dir`, in milliseconds."""
    data = _read_measured(run_dir)
    timeline = [(r, a, start * 1e3, end * 1e3) for r, a, start, end in load_measured(run_dir)]
    steps = [stage["step_s"] * 1e3 for stage in sorted(data["stages"], key=lambda s: s["stage"])]
    title = (
        f"{data['schedule']} schedule, pp={data['pp']}, m={data['m']} micro-batches, v={data['v']} "
        f"(measured on {data['device']}, {data['world_size']} ranks)"
    )
    xlabel = "time since the step's start (ms); boxes: compute only, receives and waits are idle"
    return draw(timeline, data["pp"], out_path, title, xlabel=xlabel, steps=steps)


# --- measuring a real step ------------------------------------------------------------------------------


def _world_size(cfg) -> int:
    """The world `python -m launch` would start for this config on one node without --nproc-per-node."""
    p = cfg.parallel
    if p.dp == -1:
        return cfg.dist.nproc_per_node or p.tp * p.pp * p.cp  # no GPUs are counted: one replica
    return p.dp * p.tp * p.pp * p.cp


def _measure_worker(rank: int, world_size: int, port: int, cfg_dict: dict, results) -> None:
    import torch
    import torch.distributed as dist

    from dtrain.config import config_from_dict
    from dtrain.trainer import Trainer
    from dtrain.validation import validate
    from parallel.grid import ProcessGrid

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    cfg = validate(config_from_dict(cfg_dict), world_size)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=cfg.dist.timeout_s),
    )
    try:
        p = cfg.parallel
        grid = ProcessGrid(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep, dp_shard=p.dp_shard)
        trainer = Trainer(cfg, grid, torch.device("cpu"))
        trainer.train_step()  # warm-up: first-call allocations and lazy initialisation
        executor = trainer.model.executor
        run, record, span = executor.run, [], []

        def recorded_run(*args, **kwargs):
            span.append(time.perf_counter())
            out = run(*args, record=record, **kwargs)
            span.append(time.perf_counter())
            return out

        dist.barrier()  # every rank starts the measured step together
        executor.run = recorded_run
        try:
            trainer.train_step()
        finally:
            executor.run = run
        t0, t1 = span
        c = grid.coords
        results.put(
            (
                rank,
                {
                    "stage": c.pp,
                    "first_replica": c.dp == 0 and c.cp == 0 and c.tp == 0,
                    "step_s": t1 - t0,
                    "actions": [(a.kind, a.chunk, a.microbatch, s - t0, e - t0) for a, s, e in record],
                },
            )
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(cfg_path: str, overrides: list[str], out: str | None = None) -> dict:
    """Time one training step (after one warm-up step) of the config on this machine: spawns the config's
    world of Gloo CPU processes, records each pipeline action's compute, writes the timeline of the first
    pipeline replica to `run.out_dir/pipeline_timeline.json`, draws it to `out` (when given) and returns
    {"path", "stages": [{"stage", "step_s", "busy_s", "bubble"}], "bubble", "data"}."""
    import torch.multiprocessing as mp

    from dtrain.config import load_config, microbatches_per_rank, to_dict
    from dtrain.data import build_dataset
    from dtrain.validation import validate

    cfg = load_config(cfg_path, overrides)
    world = _world_size(cfg)
    cfg = validate(cfg, world)
    build_dataset(cfg, "train")  # a missing or malformed data file fails here, before any process
    if out is not None:
        check_out_path(out)
    p = cfg.parallel
    schedule = p.pp_schedule if p.pp > 1 else "1f1b"
    v = p.pp_virtual_stages if schedule == "interleaved" else 1

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(
        _measure_worker,
        args=(world, free_port(), to_dict(cfg), results),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    gathered: dict[int, dict] = {}
    try:
        while len(gathered) < world:
            try:
                rank, payload = results.get(timeout=0.5)
                gathered[rank] = payload
            except queue.Empty:
                if procs.join(timeout=0):  # every process ended (a failure raises here)
                    break
        while not procs.join():
            pass
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()
    if len(gathered) < world:
        raise TimelineError(f"only {len(gathered)} of {world} ranks reported their timings")

    stages = sorted((s for s in gathered.values() if s["first_replica"]), key=lambda s: s["stage"])
    data = {
        "schedule": schedule,
        "pp": p.pp,
        "m": microbatches_per_rank(cfg),
        "v": v,
        "world_size": world,
        "device": "cpu (gloo)",
        "stages": stages,
    }
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    path = os.path.join(cfg.run.out_dir, MEASURED_FILE)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    summary = []
    for s in stages:
        busy = sum(end - start for *_, start, end in s["actions"])
        bubble = 1 - busy / s["step_s"]
        summary.append({"stage": s["stage"], "step_s": s["step_s"], "busy_s": busy, "bubble": bubble})
    bubble = 1 - sum(s["busy_s"] for s in summary) / sum(s["step_s"] for s in summary)
    if out is not None:
        draw_measured(path, out)
    return {"path": path, "stages": summary, "bubble": bubble, "data": data}

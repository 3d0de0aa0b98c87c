"""The scaling benchmark's report (dtrain.bench.scaling): each point's per-rank measurements become one row
(throughput, efficiency against the layout's smallest world, model-state and peak memory per rank, bytes
sent per rank per step), printed as a table and written under --out as scaling.csv, three PNG plots
(throughput.png, memory.png, comm.png; skipped with a note without matplotlib) and TensorBoard scalars
(x axis: world size; tags <mode>/<metric>/<layout>)."""

from __future__ import annotations

import math
import os
import statistics

from dtrain.bench.report import write_csv
from dtrain.bench.scaling import AXES, HELD, MODES

MIB = 2**20
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


def _row(pt, r: dict) -> dict:
    p, seq = pt.cfg.parallel, pt.cfg.train.seq_len
    # per rank: sent (total, per axis of AXES, other), predicted, held (HELD order), peak memory
    per_rank = r["per_rank"]
    n_sent = len(AXES) + 3
    held = [rank[n_sent : n_sent + len(HELD)] for rank in per_rank]

    def held_max(what: str) -> float:
        return max(sum(v for (_, k), v in zip(HELD, h, strict=True) if k == what) for h in held)

    median = statistics.median(r["step_s"])
    tokens = pt.global_batch * seq
    row = {
        "mode": pt.mode,
        "layout": pt.layout.name,
        "world": pt.world,
        **{k: getattr(p, k) for k in ("dp", "tp", "pp", "ep", "zero", "sp")},
        "global_batch": pt.global_batch,
        "tokens_per_step": tokens,
        "steps_timed": len(r["step_s"]),
        "step_ms_median": 1e3 * median,
        "step_ms_mean": 1e3 * statistics.fmean(r["step_s"]),
        "tokens_per_s": tokens / median,
        "tokens_per_s_per_rank": tokens / median / pt.world,
        "model_gflops_per_s": r["flops_per_token"] * tokens / median / 1e9,
        "held_params_bytes": held_max("params"),
        "held_grads_bytes": held_max("grads"),
        "held_optimizer_bytes": held_max("optimizer"),
        "held_host_bytes": max(
            sum(v for (w, _), v in zip(HELD, h, strict=True) if w == "host") for h in held
        ),
        "held_total_bytes": max(sum(h) for h in held),
        "peak_mem_bytes": max(rank[-1] for rank in per_rank),
        "sent_bytes_mean": statistics.fmean(rank[0] for rank in per_rank),
        "sent_bytes_max": max(rank[0] for rank in per_rank),
        "sent_predicted_bytes": statistics.fmean(rank[n_sent - 1] for rank in per_rank),
        "first_loss": r["loss"],
        "n_params": r["n_params"],
        "threads_per_rank": r["threads"],
        "attempts": r["attempts"],
    }
    for i, axis in enumerate((*AXES, "other")):
        row[f"sent_{axis}_bytes"] = statistics.fmean(rank[1 + i] for rank in per_rank)
    return row


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


def _mib(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x / MIB:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    r0, w = rows[0], max(12, 2 + max(len(r["layout"]) for r in rows))
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
            f"{_mib(r['held_total_bytes']):>11}{_mib(r['peak_mem_bytes'], 1):>10}"
            f"{_mib(r['sent_bytes_mean'], 3):>10}{_mib(r['sent_predicted_bytes'], 3):>10}"
            f"{r['first_loss']:>8.4f}"
        )
    return "\n".join(lines)


def _cell(v):
    return "" if isinstance(v, float) and math.isnan(v) else v


def plot(rows: list[dict], out: str) -> list[str]:
    """The PNGs of FIGURES (one panel per column and mode, one line per layout); [] without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print('[bench] matplotlib is not installed: no PNG plots (pip install -e ".[plot]")', flush=True)
        return []
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    worlds = sorted({r["world"] for r in rows})
    paths = []
    for name, panels in FIGURES.items():
        fig = Figure(figsize=(5.5 * len(modes), 3.4 * len(panels)))
        axes = fig.subplots(len(panels), len(modes), squeeze=False)
        for i, (column, label, divisor) in enumerate(panels):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                for layout in layouts:
                    mine = [r for r in rows if (r["mode"], r["layout"]) == (mode, layout)]
                    pts = [(r["world"], r[column] / divisor) for r in mine if not math.isnan(r[column])]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker="o", label=layout)
                if column == "efficiency":
                    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
                ax.set_xscale("log", base=2)
                ax.set_xticks(worlds, [str(w) for w in worlds])
                ax.minorticks_off()
                ax.set_title(f"{mode} scaling", fontsize=10)
                ax.set_xlabel("world size (ranks)")
                ax.set_ylabel(label, fontsize=9)
                ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def tensorboard(rows: list[dict], out: str) -> None:
    """Scalars tagged <mode>/<metric>/<layout>, x axis the world size."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=out)
    try:
        for r in rows:
            layout = r["layout"].replace("+", "_")  # TensorBoard tags take [-/\w.]
            for metric, (column, divisor) in SCALARS.items():
                if not math.isnan(r[column]):
                    writer.add_scalar(f"{r['mode']}/{metric}/{layout}", r[column] / divisor, r["world"])
    finally:
        writer.close()


def publish(rows: list[dict], out: str) -> list[dict]:
    """Prints the table and writes scaling.csv, the plots and the TensorBoard scalars into `out`."""
    os.makedirs(out, exist_ok=True)
    print(format_table(rows), flush=True)
    csv_path = os.path.join(out, "scaling.csv")
    write_csv(csv_path, COLUMNS, [[_cell(r[c]) for c in COLUMNS] for r in rows])
    written = [csv_path, *plot(rows, out)]
    tensorboard(rows, out)
    print(f"[bench] wrote {', '.join(written)} and TensorBoard scalars in {out}", flush=True)
    return rows

"""What a benchmark reports besides its table: cells in MiB or "-", wrapped notes, the model's line,
CSV rows, PNG plots and TensorBoard scalars."""

from __future__ import annotations

import csv
import math
import os
import textwrap
from fractions import Fraction

MIB = 2**20


def mib(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x) / MIB:.{digits}f}"


def text(x, spec: str, scale: float = 1.0) -> str:
    """A figure in a table cell, "-" where there is none (an implementation that did not run)."""
    return "-" if x is None else format(scale * x, spec)


def note(text: str) -> list[str]:
    """Prose under a table, wrapped and indented."""
    return textwrap.wrap(text, 104, initial_indent="  ", subsequent_indent="  ")


def model_line(c: dict, d_ff: int) -> str:
    """The model's shape from the flags `c` (vars(args)) and its feed-forward width."""
    shape = f"d_model={c['d_model']} n_layers={c['n_layers']} n_heads={c['n_heads']} d_ff={d_ff}"
    return f"model {shape} vocab={c['vocab']}"


def subset(values: dict, keys: str) -> dict:
    """The entries of `values` named in `keys` (separated by spaces), in that order."""
    return {k: values[k] for k in keys.split()}


def flat(values: dict) -> dict:
    """The CSV cells of a summary dict: numbers, text and lists of numbers (joined by ';'), nothing else."""
    cells = {}
    for k, v in values.items():
        if isinstance(v, list) and all(isinstance(x, int | float | Fraction) for x in v):
            cells[k] = ";".join(f"{float(x):.9g}" for x in v)
        elif v is None or isinstance(v, str | int | float | Fraction):
            cells[k] = v
    return cells


def write_csv(path: str, rows: list[dict]) -> None:
    """One line per row; the header holds every key, in the order they first appear."""
    header = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{float(v):.9g}" if isinstance(v, float | Fraction) else str(v)

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *([cell(row.get(k)) for k in header] for row in rows)])
    print(f"[bench] wrote {path}", flush=True)


def write_plots(rows: list[dict], out: str, figures: dict, x: str, line: str, facet: str) -> list[str]:
    """PNG files `figures` ({file: [(column, y label, divisor)]}): a row of panels per column and a column
    per value of `facet`, each panel one line per value of `line` over `x` (the world size, log2 axis);
    [] with a note when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print('[bench] matplotlib is not installed: no PNG plots (pip install -e ".[plot]")', flush=True)
        return []
    facets, lines = list(dict.fromkeys(r[facet] for r in rows)), list(dict.fromkeys(r[line] for r in rows))
    xs, paths = sorted({r[x] for r in rows}), []
    for name, panels in figures.items():
        fig = Figure(figsize=(5.5 * len(facets), 3.4 * len(panels)))
        axes = fig.subplots(len(panels), len(facets), squeeze=False)
        for (i, (column, label, divisor)), (j, value) in (
            (a, b) for a in enumerate(panels) for b in enumerate(facets)
        ):
            ax = axes[i][j]
            for series in lines:
                mine = [
                    r for r in rows if (r[facet], r[line]) == (value, series) and not math.isnan(r[column])
                ]
                if mine:
                    ax.plot(
                        [r[x] for r in mine], [r[column] / divisor for r in mine], marker="o", label=series
                    )
            if column == "efficiency":
                ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.minorticks_off()
            ax.set_title(f"{value} scaling", fontsize=10)
            ax.set_xlabel("world size (ranks)")
            ax.set_ylabel(label, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=110)
    return paths


def write_scalars(rows: list[dict], out: str, scalars: dict, x: str, line: str, facet: str) -> None:
    """TensorBoard scalars ({metric: (column, divisor)}) tagged <facet>/<metric>/<line>, step = `x`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=out)
    try:
        for r in rows:
            series = str(r[line]).replace("+", "_")  # TensorBoard tags take [-/\w.]
            for metric, (column, divisor) in scalars.items():
                if not math.isnan(r[column]):
                    writer.add_scalar(f"{r[facet]}/{metric}/{series}", r[column] / divisor, r[x])
    finally:
        writer.close()

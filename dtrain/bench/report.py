"""What the benchmark commands share in their output: the model line of the table header, and printing
the table and writing the CSV summary once rank 0's results are back."""

from __future__ import annotations

import csv
from collections.abc import Callable


def model_line(c: dict, d_ff: int) -> str:
    """The model's shape from the flags `c` (vars(args)) and its feed-forward width."""
    return (
        f"model d_model={c['d_model']} n_layers={c['n_layers']} n_heads={c['n_heads']} d_ff={d_ff} "
        f"vocab={c['vocab']}"
    )


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)


def publish(summary: dict, format_table: Callable, csv_rows: Callable, csv_path: str | None) -> dict:
    """Prints the summary's table; with --csv also writes its rows (csv_rows: header, rows) to that file.
    Returns the summary, for the command's caller."""
    print(format_table(summary), flush=True)
    if csv_path:
        write_csv(csv_path, *csv_rows(summary))
        print(f"[bench] wrote {csv_path}", flush=True)
    return summary

"""The pipeline benchmark's report (dtrain.bench.pipeline): every rank's step records summarised into step
times, bubbles and activation peaks per schedule, set against the formulas, printed as tables and written
as CSV rows."""

from __future__ import annotations

import statistics

from dtrain.bench.pipeline_bubble import (
    SCHEDULES,
    formula_bubble,
    simulate_order,
    simulate_ours,
    virtual_stages,
)
from dtrain.bench.pipeline_pytorch import PYTORCH_CLASSES
from dtrain.bench.report import model_line
from dtrain.bench.timing import median_mean
from dtrain.bench.world import threads_per_rank

IMPLS = ("ours", "pytorch")
LABELS = {"ours": "dtrain (ours)", "pytorch": "PyTorch pipelining"}


def _impl_summary(per_rank: list[list[list[float]]], losses: list[float], peaks: list[float]) -> dict:
    """per_rank[r][step] = [step s, pipeline s, forward s, backward s] of rank r."""
    n_ranks, n_steps = len(per_rank), len(per_rank[0])
    step_s, pipe_s, bubble, bubble_step, busy = [], [], [], [], []
    for i in range(n_steps):
        rows = [per_rank[r][i] for r in range(n_ranks)]
        step, pipe = max(row[0] for row in rows), max(row[1] for row in rows)  # the slowest rank
        busies = [row[2] + row[3] for row in rows]
        step_s.append(step)
        pipe_s.append(pipe)
        busy.append(statistics.fmean(busies))
        bubble.append(statistics.fmean(1 - b / pipe for b in busies))
        bubble_step.append(statistics.fmean(1 - b / step for b in busies))
    return {
        **median_mean(step_s),
        "pipeline_s": statistics.median(pipe_s),
        "busy_s": statistics.median(busy),
        "bubble": statistics.median(bubble),
        "bubble_step": statistics.median(bubble_step),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_bytes": peaks,
    }


def summarise(args, raw: dict, d_ff: int) -> dict:
    p, m = args.pp, args.microbatches
    rows = {}
    for schedule, r in raw.items():
        v = virtual_stages(schedule)
        sim = simulate_ours(schedule, p, m)
        row = {
            "v": v,
            "formula": formula_bubble(schedule, p, m, v),
            "simulate": sim["bubble"],
            "in_flight": sim["peak_in_flight"],
            "errors": r["errors"],
            "impls": {},
        }
        row["simulate_pytorch"], row["simulate_pytorch_note"] = simulate_order(r["pytorch_order"], p)
        for name, per_rank in r["per_rank"].items():
            row["impls"][name] = _impl_summary(per_rank, r["losses"][name], r["peaks"][name])
            row["impls"][name]["held_after_bytes"] = r["held"][name]
        impls = row["impls"]
        if "ours" in impls:
            o = impls["ours"]
            o["formula_pipeline_s"] = o["busy_s"] / (1 - row["formula"])
        if {"ours", "pytorch"} <= set(impls):
            o, t = impls["ours"], impls["pytorch"]
            row["ratio"] = o["median_s"] / t["median_s"]
            row["loss_rel_diff"] = abs(o["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
        rows[schedule] = row
    return {"config": vars(args), "d_ff": d_ff, "schedules": rows}


def _label(schedule: str, v: int) -> str:
    return f"{schedule} v={v}" if v > 1 else schedule


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def _frac(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(s: dict) -> str:
    c = s["config"]
    p, m = c["pp"], c["microbatches"]
    rows = s["schedules"]
    tokens = c["microbatches"] * c["micro_batch"] * c["seq_len"]
    lines = [
        "",
        f"== pipeline parallelism: pp={p}, m={m} micro-batches of {c['micro_batch']} x {c['seq_len']} tokens "
        f"| Gloo on CPU, {threads_per_rank(p)} thread(s) per rank ==",
        f"{model_line(c, s['d_ff'])} | {tokens} tokens/step",
        f"{c['steps']} timed steps per implementation and schedule after 2 untimed (first-step loss, "
        f"activation count) + {c['warmup']} warm-up, the two alternating; step time = slowest rank",
        "",
        "step time (median ms) and first-step loss",
        f"  {'schedule':<16}{'ours':>9}{'PyTorch':>9}{'ours/PT':>9}{'loss ours':>12}{'loss PT':>12}"
        f"{'rel diff':>10}",
    ]
    for schedule, r in rows.items():
        o, t = r["impls"].get("ours"), r["impls"].get("pytorch")
        loss_o = f"{o['first_loss']:.6f}" if o else "-"
        loss_t = f"{t['first_loss']:.6f}" if t else "-"
        diff = f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else "-"
        lines.append(
            f"  {_label(schedule, r['v']):<16}{_ms(o and o['median_s']):>9}{_ms(t and t['median_s']):>9}"
            f"{_frac(r.get('ratio')):>9}{loss_o:>12}{loss_t:>12}{diff:>10}"
        )
    for schedule, r in rows.items():
        for name, error in r["errors"].items():
            lines.append(
                f"  {LABELS[name]} {PYTORCH_CLASSES[schedule] if name == 'pytorch' else schedule}: "
                f"not done: {error}"
            )
    lines += [
        "",
        "bubble: idle share of the pipeline phase (barrier to the end of the schedule, slowest rank), mean",
        "over ranks; formula from FORMULAS.md as an idle share, interleaved (p-1)/(v*m) converted to",
        "(p-1)/(v*m+p-1); simulate = parallel.pipeline_schedules.simulate (F=1, B=2, no communication)",
        f"  {'schedule':<16}{'formula':>8}{'sim ours':>9}{'sim PT':>8}{'ours':>8}{'PyTorch':>8}{'ours/fm':>8}"
        f"{'PT/fm':>8}{'ours/PT':>8}{'ours step':>10}{'pipe ms':>9}{'fm ms':>8}{'pipe/fm':>8}",
    ]
    notes = []
    for schedule, r in rows.items():
        o, t = r["impls"].get("ours"), r["impls"].get("pytorch")
        fm = r["formula"]
        ob, tb = o and o["bubble"], t and t["bubble"]
        cells = [
            (8, f"{fm:.3f}"),
            (9, f"{r['simulate']:.3f}"),
            (8, _frac(r["simulate_pytorch"])),
            (8, _frac(ob)),
            (8, _frac(tb)),
            (8, _frac(_ratio(ob, fm))),
            (8, _frac(_ratio(tb, fm))),
            (8, _frac(_ratio(ob, tb))),
            (10, _frac(o and o["bubble_step"])),
            (9, _ms(o and o["pipeline_s"])),
            (8, _ms(o and o["formula_pipeline_s"])),
            (8, _frac(_ratio(o and o["pipeline_s"], o and o["formula_pipeline_s"]))),
        ]
        lines.append(f"  {_label(schedule, r['v']):<16}" + "".join(f"{text:>{w}}" for w, text in cells))
        if r["simulate_pytorch_note"] and "pytorch" in r["impls"]:
            notes.append(f"  sim PT {schedule}: {PYTORCH_CLASSES[schedule]}: {r['simulate_pytorch_note']}")
    lines += [
        "  ours step = 1 - busy / whole step time (clipping and AdamW count as idle); fm ms = busy time per",
        "  rank / (1 - formula): the pipeline phase the formula predicts for the measured compute",
        *notes,
        "",
        "peak activation memory held for backward per rank (MiB; saved-tensor storages, parameters",
        "excluded), and the GPipe / 1F1B ratio against FORMULAS.md's m / (p - r)",
    ]
    present = [sch for sch in SCHEDULES if sch in rows]
    head = "".join(f"{_label(sch, rows[sch]['v']):>16}" for sch in present)
    lines.append(f"  {'implementation':<20}{'rank':>5}{head}{'gpipe/1f1b':>12}{'m/(p-r)':>9}")
    for name in IMPLS:
        for rank in range(p):
            cells, peaks = "", {}
            for sch in present:
                impl = rows[sch]["impls"].get(name)
                peaks[sch] = impl["peak_bytes"][rank] if impl else None
                cells += f"{'-' if peaks[sch] is None else f'{peaks[sch] / 2**20:.2f}':>16}"
            ratio = (
                f"{peaks['gpipe'] / peaks['1f1b']:.2f}" if peaks.get("gpipe") and peaks.get("1f1b") else "-"
            )
            lines.append(f"  {LABELS[name]:<20}{rank:>5}{cells}{ratio:>12}{m / (p - rank):>9.2f}")
    flights = "; ".join(f"{_label(sch, rows[sch]['v'])} {rows[sch]['in_flight']}" for sch in present)
    lines.append(f"  in flight per rank (simulate, chunk micro-batches): {flights}")
    held = [
        b for r in rows.values() for impl in r["impls"].values() for b in impl.get("held_after_bytes", [])
    ]
    lines.append(f"  still held at the end of the counting step (should be 0): {max(held, default=0):.0f} B")
    return "\n".join(lines)


def csv_rows(s: dict) -> tuple[list[str], list[list]]:
    """The CSV header and one summary row per schedule and implementation (one not done: its error)."""
    c = s["config"]
    keys = (
        "pp",
        "microbatches",
        "d_model",
        "n_layers",
        "n_heads",
        "seq_len",
        "micro_batch",
        "vocab",
        "steps",
    )
    header = [
        *keys,
        "schedule",
        "impl",
        "median_s",
        "mean_s",
        "ratio_ours_over_pytorch",
        "pipeline_s",
        "bubble_measured",
        "bubble_whole_step",
        "bubble_formula",
        "bubble_simulate",
        "first_loss",
        "peak_activation_bytes_per_rank",
        "error",
    ]
    rows = []
    for schedule, r in s["schedules"].items():
        for name in IMPLS:
            impl = r["impls"].get(name)
            sim = r["simulate"] if name == "ours" else r["simulate_pytorch"]
            if impl:
                values = [
                    f"{impl['median_s']:.6f}",
                    f"{impl['mean_s']:.6f}",
                    f"{r['ratio']:.4f}" if "ratio" in r else "",
                    f"{impl['pipeline_s']:.6f}",
                    f"{impl['bubble']:.4f}",
                    f"{impl['bubble_step']:.4f}",
                    f"{r['formula']:.4f}",
                    "" if sim is None else f"{sim:.4f}",
                    f"{impl['first_loss']:.6f}",
                    ";".join(f"{b:.0f}" for b in impl["peak_bytes"]),
                    "",
                ]
            else:
                values = [*[""] * 6, f"{r['formula']:.4f}", "", "", "", r["errors"].get(name, "")]
            rows.append([*(c[k] for k in keys), schedule, name, *values])
    return header, rows

"""The tensor-parallel benchmark's report (dtrain.bench.tensor_parallel): rank 0's measurements summarised
into step times, their ratio and bytes sent per rank, printed as a table and written as CSV rows."""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

from dtrain.bench.comm import PHASES
from dtrain.bench.report import model_line
from dtrain.bench.timing import median_mean
from dtrain.bench.world import threads_per_rank

if TYPE_CHECKING:
    from dtrain.bench.tensor_parallel import Analytic

LABELS = {"ours": "dtrain (ours)", "pytorch": "PyTorch DTensor"}


def summarise(args, raw: dict) -> dict:
    tokens = args.batch * args.seq_len
    impls = {}
    for name, times in raw["times"].items():
        calls = raw["comm"][name]["calls"]
        by = {}
        for c in calls:
            count, sent = by.get((c.phase, c.kind), (0, Fraction(0)))
            by[(c.phase, c.kind)] = (count + 1, sent + c.sent)
        stats = median_mean(times)
        impls[name] = {
            **stats,
            "tokens_per_s": tokens / stats["median_s"],
            "first_loss": raw["losses"][name][0],
            "last_loss": raw["losses"][name][-1],
            "bytes_sent": sum((c.sent for c in calls), Fraction(0)),
            "by_phase_kind": by,
            "counts": raw["comm"][name]["counts"],
        }
    a: Analytic = raw["analytic"]
    s = {
        "config": vars(args),
        "d_ff": raw["d_ff"],
        "impls": impls,
        "analytic": a,
        "pytorch_error": raw["pytorch_error"],
        "measured_bytes": impls["ours"]["bytes_sent"],
        "analytic_bytes": a.total,
        "formulas_bytes": a.formulas,
    }
    s["bytes_match"] = s["measured_bytes"] == a.total
    if "pytorch" in impls:
        s["ratio"] = impls["ours"]["median_s"] / impls["pytorch"]["median_s"]
        s["ratio_mean"] = impls["ours"]["mean_s"] / impls["pytorch"]["mean_s"]
    return s


def _mib(x) -> str:
    return f"{float(x) / 2**20:.3f} MiB"


def format_table(s: dict) -> str:
    c = s["config"]
    lines = [
        "",
        f"== tensor parallelism: tp={c['tp']} sp={c['sp']} | Gloo on CPU, "
        f"{threads_per_rank(c['tp'])} threads per rank ==",
        f"{model_line(c, s['d_ff'])} | batch={c['batch']} seq_len={c['seq_len']} "
        f"({c['batch'] * c['seq_len']} tokens/step)",
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 counting step, the two alternating; "
        f"step time = slowest rank",
        "",
        f"{'implementation':<18}{'median ms':>10}{'mean ms':>10}{'tokens/s':>10}"
        f"{'loss step 1':>13}{'loss last':>11}",
    ]
    for name, r in s["impls"].items():
        lines.append(
            f"{LABELS[name]:<18}{1e3 * r['median_s']:>10.1f}{1e3 * r['mean_s']:>10.1f}"
            f"{r['tokens_per_s']:>10.0f}{r['first_loss']:>13.5f}{r['last_loss']:>11.5f}"
        )
    if "ratio" in s:
        lines.append(
            f"ratio ours / PyTorch step time: {s['ratio']:.3f} (median), {s['ratio_mean']:.3f} (mean); "
            f"lower is better for us"
        )
    else:
        lines.append(f"PyTorch not measured: {s['pytorch_error']}")
    a: Analytic = s["analytic"]
    w = 80
    lines += ["", "bytes sent per rank per step (ring costs, FORMULAS.md), ours:"]
    lines += [f"  {label:<{w}}{_mib(value):>13}" for label, value in a.terms]
    lines += [
        f"  {'FORMULAS.md per-layer figure x layers (4 all-reduces of b*s*h per layer)':<{w}}"
        f"{_mib(a.formulas):>13}",
        f"  {'analytic total for our model':<{w}}{_mib(a.total):>13}",
        f"  {'measured (torch.distributed calls recorded in the counting step)':<{w}}"
        f"{_mib(s['measured_bytes']):>13}",
        f"  measured / analytic = {float(s['measured_bytes'] / a.total):.6f}; "
        f"measured == analytic: {s['bytes_match']} "
        f"({float(s['measured_bytes']):.0f} B vs {float(a.total):.0f} B); "
        f"analytic / FORMULAS.md = {float(a.total / a.formulas):.4f}",
    ]
    if "pytorch" in s["impls"]:
        p = s["impls"]["pytorch"]["bytes_sent"]
        lines.append(
            f"  {'PyTorch measured (DTensor functional collectives at the dispatcher)':<{w}}{_mib(p):>13}"
        )
    lines += ["", "collectives per step", f"  {'':<18}{'phase':<24}{'op':<16}{'calls':>6}{'sent':>14}"]
    for name, r in s["impls"].items():
        label = LABELS[name]
        rows = sorted(r["by_phase_kind"].items(), key=lambda kv: (PHASES.index(kv[0][0]), kv[0][1]))
        for (phase, kind), (count, sent) in rows:
            lines.append(f"  {label:<18}{phase:<24}{kind:<16}{count:>6}{_mib(sent):>14}")
            label = ""
        counts = ", ".join(f"{op} {n}" for op, n in sorted(r["counts"].items()))
        lines.append(f"  {'':<18}dispatcher ops: {counts}")
    if c["sp"] and "pytorch" in s["impls"]:
        lines.append(
            "  (PyTorch leaves the norm gains' gradients Partial after backward; every AdamW foreach op that "
            "reads one\n   redistributes it, hence its optimizer-step all-reduces)"
        )
    return "\n".join(lines)


def csv_rows(s: dict) -> tuple[list[str], list[list]]:
    """The CSV header and one summary row per implementation."""
    c = s["config"]
    keys = ("tp", "sp", "d_model", "n_layers", "n_heads", "seq_len", "batch", "vocab", "steps", "warmup")
    header = [
        *keys,
        "impl",
        "median_s",
        "mean_s",
        "tokens_per_s",
        "ratio_ours_over_pytorch",
        "bytes_sent_per_rank",
        "analytic_bytes_per_rank",
        "formulas_bytes_per_rank",
    ]
    rows = [
        [
            *(c[k] for k in keys),
            name,
            f"{r['median_s']:.6f}",
            f"{r['mean_s']:.6f}",
            f"{r['tokens_per_s']:.1f}",
            f"{s['ratio']:.4f}" if "ratio" in s else "",
            f"{float(r['bytes_sent']):.0f}",
            f"{float(s['analytic_bytes']):.0f}" if name == "ours" else "",
            f"{float(s['formulas_bytes']):.0f}",
        ]
        for name, r in s["impls"].items()
    ]
    return header, rows

"""The MoE benchmark's report (dtrain.bench.moe): rank 0's measurements summarised into step times, output
and gradient agreement and bytes sent per rank for both dispatchers, and expert load over training;
printed as tables and written as CSV rows."""

from __future__ import annotations

import statistics
from fractions import Fraction

from dtrain.bench.comm import PHASES
from dtrain.bench.report import write_csv
from dtrain.bench.timing import median_mean
from dtrain.bench.world import threads_per_rank

LABELS = {"alltoall": "all-to-all (ours)", "allgather": "all-gather"}
SHORT = {"alltoall": "a2a", "allgather": "ag"}
MIB = 2**20
COUNT_EXCHANGE = "count exchange fwd: all-to-all of E int64 (E/ep to each peer)"


def _per_rank(d: dict, name: str, rank: int) -> dict:
    view = d["per_rank"][rank]
    calls, terms = view["calls"][name], view["analytic"][name]
    by: dict[tuple[str, str], tuple[int, Fraction]] = {}
    for c in calls:
        count, sent = by.get((c.phase, c.kind), (0, Fraction(0)))
        by[(c.phase, c.kind)] = (count + 1, sent + c.sent)
    measured = sum((c.sent for c in calls), Fraction(0))
    analytic = sum((v for _, v in terms), Fraction(0))
    return {
        "median_s": statistics.median(d["per_rank_times"][name][rank]),
        "measured_bytes": measured,
        "analytic_bytes": analytic,
        "bytes_match": measured == analytic,
        "terms": terms,
        "by_phase_kind": by,
    }


def summarise_load(args, records: list[dict]) -> dict:
    """Per step and MoE layer: expert loads (slots routed to each expert, before dropping, over every
    rank), their max and min over the mean, the dropped share and the load-balancing loss."""
    layers = sorted(
        {int(k.split("/")[1][len("layer") :]) for r in records for k in r if k.endswith("per_expert")}
    )
    slots = args.ep * args.micro_batch * args.seq_len * args.top_k  # one micro-batch per rank and step
    steps = []
    for r in records:
        row = {"step": r["step"], "loss": r["loss"], "time_s": r["time_s"], "layers": {}}
        for i in layers:
            counts = r[f"moe/layer{i}/tokens_per_expert"]
            mean = sum(counts) / len(counts)
            row["layers"][i] = {
                "counts": counts,
                "sum": sum(counts),
                "max_over_mean": max(counts) / mean,
                "min_over_mean": min(counts) / mean,
                "dropped_frac": r[f"moe/layer{i}/dropped_frac"],
                "aux_loss": r[f"moe/layer{i}/aux_loss"],
            }
        steps.append(row)
    n = len(steps)
    picks = sorted({0, (n - 1) // 2, n - 1}) if n else []
    return {
        "layers": layers,
        "slots_per_step": slots,
        "steps": steps,
        "picks": picks,
        "sums_match": all(v["sum"] == slots for s in steps for v in s["layers"].values()),
    }


def summarise(args, raw: dict) -> dict:
    d = raw["dispatch"]
    ep = args.ep
    impls = {}
    for name, times in d["times"].items():
        impls[name] = {
            **median_mean(times),
            "first_loss": d["losses"][name][0],
            "ranks": [_per_rank(d, name, r) for r in range(ep)],
        }
    formulas_step = 4 * d["formulas_per_all_to_all"]
    for r in impls["alltoall"]["ranks"]:  # the token rows against FORMULAS.md (the counts are extra)
        r["row_bytes"] = sum((v for label, v in r["terms"] if label != COUNT_EXCHANGE), Fraction(0))
        r["over_formulas"] = r["row_bytes"] / formulas_step
    names = d["diff_names"]
    diffs = {
        n: (max(rank[2 * i] for rank in d["diffs"]), max(rank[2 * i + 1] for rank in d["diffs"]))
        for i, n in enumerate(names)
    }
    counts = d["counts"]
    kept = sum(map(sum, counts))
    return {
        "config": vars(args),
        "d_ff": d["d_ff"],
        "itemsize": d["itemsize"],
        "capacity": d["capacity"],
        "counts": counts,
        "kept_slots": kept,
        "routed_slots": ep * args.tokens * args.top_k,
        "impls": impls,
        "ratio": impls["alltoall"]["median_s"] / impls["allgather"]["median_s"],
        "diffs": diffs,
        "max_diff": max(v[0] for v in diffs.values()),
        "identical": all(d["identical"]),
        "formulas_per_all_to_all": d["formulas_per_all_to_all"],
        "formulas_step": formulas_step,
        "bytes_match": all(r["bytes_match"] for impl in impls.values() for r in impl["ranks"]),
        "load": summarise_load(args, raw["load"]),
    }


def _mib(x) -> str:
    return f"{float(x) / MIB:.3f} MiB"


def _dispatch_lines(s: dict) -> list[str]:
    c, ep = s["config"], s["config"]["ep"]
    local = c["experts"] // ep
    lines = [
        "",
        f"== MoE dispatch: ep={ep}, {c['experts']} experts ({local} per rank), top-{c['top_k']}, capacity "
        f"factor {c['capacity_factor']} | Gloo on CPU, {threads_per_rank(ep)} threads per rank ==",
        f"one MoE layer d_model={c['d_model']} d_ff={s['d_ff']} ({c['dtype']}), forward + backward; T = "
        f"{c['tokens']} tokens per rank, capacity {s['capacity']} slots per expert; kept "
        f"{s['kept_slots']} of {s['routed_slots']} routed slots over all ranks",
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
    lines.append(f"ratio all-to-all / all-gather step time: {s['ratio']:.3f} (slowest-rank medians)")
    parts = ", ".join(f"{n} {v[0]:.3g} (of {v[1]:.3g})" for n, v in s["diffs"].items())
    lines += [
        f"outputs and gradients, all-to-all vs all-gather, largest |difference| over ranks: {parts}; "
        f"bitwise identical: {s['identical']}",
        "",
        "bytes sent per rank per layer step (forward + backward):",
    ]
    w = 66
    for name, impl in s["impls"].items():
        for rank, r in enumerate(impl["ranks"]):
            lines.append(f"  {LABELS[name]}, rank {rank}:")
            lines += [f"    {label:<{w}}{_mib(value):>14}" for label, value in r["terms"]]
            lines.append(
                f"    {'measured (collectives recorded in the counting step)':<{w}}"
                f"{_mib(r['measured_bytes']):>14}"
                f"   == analytic: {r['bytes_match']} ({float(r['measured_bytes']):.0f} B)"
            )
            if name == "alltoall":
                lines.append(
                    f"    {'FORMULAS.md balanced: 4 all-to-alls x (ep-1)/ep * T*k*d*bytes':<{w}}"
                    f"{_mib(s['formulas_step']):>14}   token rows / FORMULAS.md = "
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
        f"  {'':<20}{'phase':<12}{'op':<16}{'calls':>6}{'sent':>14}",
    ]
    for name, impl in s["impls"].items():
        label = LABELS[name]
        rows = sorted(
            impl["ranks"][0]["by_phase_kind"].items(), key=lambda kv: (PHASES.index(kv[0][0]), kv[0][1])
        )
        for (phase, kind), (count, sent) in rows:
            lines.append(f"  {label:<20}{phase:<12}{kind:<16}{count:>6}{_mib(sent):>14}")
            label = ""
    return lines


def _load_lines(s: dict) -> list[str]:
    c, load = s["config"], s["load"]
    if not load["steps"]:
        return ["", "expert load over training: not run (--train-steps 0)"]
    tokens = c["ep"] * c["micro_batch"] * c["seq_len"]
    lines = [
        "",
        f"== expert load over training: dtrain Trainer, dp=ep={c['ep']}, {len(load['layers'])} MoE layers, "
        f"{c['experts']} experts, top-{c['top_k']}, capacity factor {c['capacity_factor']} ==",
        f"model d_model={c['d_model']} n_heads={c['n_heads']} vocab={c['vocab']}, synthetic data, "
        f"{tokens} tokens per step ({c['micro_batch']} x {c['seq_len']} per rank), "
        f"{len(load['steps'])} steps",
        "load = slots routed to an expert per step over all ranks, before dropping "
        "(moe/layer{i}/tokens_per_expert);",
        f"tokens per expert sum to tokens*k = {load['slots_per_step']} every step: {load['sums_match']}",
        "",
        f"{'step':>5}{'loss':>9}{'layer':>7}{'max/mean':>10}{'min/mean':>10}{'dropped':>9}{'aux loss':>10}   "
        "tokens per expert",
    ]
    for i in load["picks"]:
        step = load["steps"][i]
        first = True
        for layer, v in step["layers"].items():
            head = f"{step['step']:>5}{step['loss']:>9.4f}" if first else " " * 14
            lines.append(
                f"{head}{layer:>7}{v['max_over_mean']:>10.3f}{v['min_over_mean']:>10.3f}"
                f"{v['dropped_frac']:>9.4f}{v['aux_loss']:>10.4f}   {v['counts']}"
            )
            first = False
    lines.append("(aux loss = E * sum_e f_e * m_e: 1.0 for perfectly balanced routing)")
    return lines


def format_table(s: dict) -> str:
    return "\n".join([*_dispatch_lines(s), *_load_lines(s)])


def csv_rows(s: dict) -> tuple[list[str], list[list]]:
    """The CSV header and one row per dispatcher and rank."""
    c = s["config"]
    keys = ("ep", "experts", "top_k", "capacity_factor", "tokens", "d_model", "dtype", "steps", "warmup")
    header = [
        *keys,
        "d_ff",
        "dispatcher",
        "rank",
        "median_s",
        "slowest_rank_median_s",
        "bytes_sent",
        "analytic_bytes",
        "formulas_bytes",
    ]
    rows = [
        [
            *(c[k] for k in keys),
            s["d_ff"],
            name,
            rank,
            f"{r['median_s']:.6f}",
            f"{impl['median_s']:.6f}",
            f"{float(r['measured_bytes']):.0f}",
            f"{float(r['analytic_bytes']):.0f}",
            f"{float(s['formulas_step']):.0f}" if name == "alltoall" else "",
        ]
        for name, impl in s["impls"].items()
        for rank, r in enumerate(impl["ranks"])
    ]
    return header, rows


def write_load_csv(path: str, s: dict) -> None:
    """One row per training step and MoE layer: loss, load figures and every expert's load."""
    experts = s["config"]["experts"]
    header = ["step", "layer", "loss", "step_s", "max_over_mean", "min_over_mean", "dropped_frac", "aux_loss"]
    header += [f"expert{e}" for e in range(experts)]
    rows = [
        [
            step["step"],
            layer,
            f"{step['loss']:.6f}",
            f"{step['time_s']:.4f}",
            f"{v['max_over_mean']:.4f}",
            f"{v['min_over_mean']:.4f}",
            f"{v['dropped_frac']:.6f}",
            f"{v['aux_loss']:.6f}",
            *v["counts"],
        ]
        for step in s["load"]["steps"]
        for layer, v in step["layers"].items()
    ]
    write_csv(path, header, rows)

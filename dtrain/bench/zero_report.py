"""The ZeRO benchmark's report (dtrain.bench.zero): rank 0's measurements summarised into step times and
their ratio to torch DDP, bytes held per parameter against FORMULAS.md, peak RSS, and bytes sent per rank
against the analytic counts; printed as tables and written as CSV rows."""

from __future__ import annotations

import statistics
from fractions import Fraction

from dtrain.bench.comm import ALL_REDUCE
from dtrain.bench.report import model_line
from dtrain.bench.timing import median_mean
from dtrain.bench.world import threads_per_rank
from dtrain.bench.zero_pytorch import NORM_LOSS

LABELS = {
    "ddp": "ours DDP (zero=0)",
    "zero1": "ours ZeRO-1",
    "zero1-offload": "ours ZeRO-1 + offload",
    "zero2": "ours ZeRO-2",
    "zero2-offload": "ours ZeRO-2 + offload",
    "zero3": "ours ZeRO-3",
    "zero3-offload": "ours ZeRO-3 + offload",
    "torch-ddp": "torch DDP",
    "torch-zero1": "torch ZeroRedundancyOpt",
    "torch-fsdp2": "torch FSDP2",
}
SHORT = {
    "ddp": "DDP",
    "zero1": "Z1",
    "zero1-offload": "Z1+off",
    "zero2": "Z2",
    "zero2-offload": "Z2+off",
    "zero3": "Z3",
    "zero3-offload": "Z3+off",
    "torch-ddp": "tDDP",
    "torch-zero1": "tZRO",
    "torch-fsdp2": "tFSDP2",
}
STAGE = {"torch-ddp": 0, "torch-zero1": 1, "torch-fsdp2": 3} | {
    f"zero{s}{o}": s for s in (1, 2, 3) for o in ("", "-offload")
}
HELD_KEYS = [(where, what) for where in ("device", "host") for what in ("params", "grads", "optimizer")]
SCALAR_BYTES = 8  # our all-reduces of one number (loss sum, squared gradient norm): not model-state traffic
MIB = 2**20


def predicted(name: str, n: int) -> tuple[float, float, str]:
    """FORMULAS.md's bytes per parameter (fp32 + Adam): (device, host, how). Offload moves the optimizer
    states to host memory, where ours also keeps the fp32 master copy of its shard: 8/N + 4/N."""
    stage = STAGE.get(name, 0)
    total = {0: 16, 1: 8 + 8 / n, 2: 4 + 12 / n, 3: 16 / n}[stage]
    how = {0: "4+4+8", 1: "4+4+8/N", 2: "4+12/N", 3: "16/N"}[stage]
    if name.endswith("-offload"):
        device = total - 8 / n
        how = {1: "4+4", 2: "4+4/N", 3: "8/N"}[stage]
        return device, 12 / n, f"{how} = {device:.3f} + host 12/N = {12 / n:.3f}"
    return total, 0.0, f"{how} = {total:.3f}"


def _norm_loss(call) -> bool:
    """Gradient-norm and loss all-reduces: PyTorch's by phase, ours (Trainer) by size (one number each)."""
    return call.phase == NORM_LOSS or (call.kind == ALL_REDUCE and call.full_bytes <= SCALAR_BYTES)


def _comm(c: dict, name: str, n: int, psi: int) -> dict:
    calls = c.get("recorded_calls", c["dispatch_calls"])
    formula = (3 if STAGE.get(name, 0) == 3 else 2) * psi * 4
    by_kind: dict[str, list] = {}
    for call in calls:
        row = by_kind.setdefault(
            f"{call.kind}{' (norm, loss)' if _norm_loss(call) else ''}", [0, Fraction(0)]
        )
        row[0], row[1] = row[0] + 1, row[1] + call.sent
    out = {
        "sent": sum((x.sent for x in calls), Fraction(0)),
        "model_states": sum((x.sent for x in calls if not _norm_loss(x)), Fraction(0)),
        "dispatch_sent": sum((x.sent for x in c["dispatch_calls"]), Fraction(0)),
        "formula": Fraction(formula),
        "exact_ring": Fraction(formula * (n - 1), n),
        "by_kind": by_kind,
        "counts": c["dispatch_counts"],
        "bucket_traffic": c.get("bucket_traffic"),
    }
    if out["bucket_traffic"] is not None:
        out["padding"] = out["bucket_traffic"] - c["unpadded_traffic"]
    if "recorded_calls" in c:
        out["dispatch_agrees"] = out["dispatch_sent"] == out["sent"]
    if out["bucket_traffic"] is not None:
        out["buckets_match"] = out["model_states"] == out["bucket_traffic"]
    return out


def summarise(args, raw: dict) -> dict:
    n, psi = args.dp, raw["n_params"]
    impls = {}
    for name, times in raw["times"].items():
        c = raw["counted"][name]
        per_rank = [dict(zip(HELD_KEYS, row, strict=True)) for row in c["held"]]
        peak = max(per_rank, key=lambda r: sum(r.values()))  # the rank holding most
        device = sum(v for (where, _), v in peak.items() if where == "device")
        host = sum(v for (where, _), v in peak.items() if where == "host")
        want_device, want_host, how = predicted(name, n)
        impls[name] = {
            **median_mean(times),
            "first_loss": raw["losses"][name][0],
            "last_loss": raw["losses"][name][-1],
            "held_per_rank": [{f"{w}_{k}": v for (w, k), v in r.items()} for r in per_rank],
            "device_per_param": device / psi,
            "host_per_param": host / psi,
            "predicted_device": want_device,
            "predicted_host": want_host,
            "predicted_how": how,
            "held_ratio": (device + host) / psi / (want_device + want_host),
            "rss_growth": max(r[0] for r in raw["rss"][name]),
            **_comm(c, name, n, psi),
        }
    if "torch-ddp" in impls:
        for r in impls.values():
            r["ratio_to_torch_ddp"] = r["median_s"] / impls["torch-ddp"]["median_s"]
    first = [r["first_loss"] for r in impls.values()]
    middle = statistics.median(first)
    return {
        "config": vars(args),
        "d_ff": raw["d_ff"],
        "n_params": psi,
        "impls": impls,
        "errors": raw["errors"],
        "loss_spread": max(abs(x - middle) / abs(middle) for x in first),
        "peak_rss": max(r[1] for rows in raw["rss"].values() for r in rows),
    }


def _mib(x) -> str:
    return f"{float(x) / MIB:.3f}"


def format_table(s: dict) -> str:
    c, n, psi = s["config"], s["config"]["dp"], s["n_params"]
    tokens = c["micro_batch"] * c["seq_len"]
    lines = [
        "",
        f"== ZeRO data parallelism: dp={n} | Gloo on CPU, {threads_per_rank(n)} threads per rank ==",
        f"{model_line(c, s['d_ff'])} | Ψ = {psi:,} parameters ({_mib(4 * psi)} MiB fp32)",
        f"per rank and step {c['micro_batches']} micro-batch(es) of {c['micro_batch']} x {c['seq_len']} "
        f"tokens ({n * c['micro_batches'] * tokens} tokens/step); our buckets {c['bucket_mb']} MB",
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 counting step, all alternating; "
        f"step time = slowest rank",
        "",
        f"{'implementation':<25}{'median ms':>10}{'mean ms':>10}{'/ torch DDP':>13}{'loss step 1':>13}"
        f"{'loss last':>11}",
    ]
    for name, r in s["impls"].items():
        ratio = f"{r['ratio_to_torch_ddp']:.3f}" if "ratio_to_torch_ddp" in r else "-"
        lines.append(
            f"{LABELS[name]:<25}{1e3 * r['median_s']:>10.1f}{1e3 * r['mean_s']:>10.1f}{ratio:>13}"
            f"{r['first_loss']:>13.6f}{r['last_loss']:>11.6f}"
        )
    for name, error in s["errors"].items():
        lines.append(f"{LABELS[name]:<25}not run: {error}")
    lines.append(f"first-step losses: largest relative difference from their median {s['loss_spread']:.2e}")

    lines += [
        "",
        f"model states held per rank after a step, bytes per parameter (N = {n}; the rank holding most)",
        f"{'implementation':<25}{'device':>8}{'host':>8}{'total':>8}   {'FORMULAS.md (device + host)':<36}"
        f"{'meas/pred':>10}{'MiB':>9}{'RSS +MiB':>10}",
    ]
    for name, r in s["impls"].items():
        total = r["device_per_param"] + r["host_per_param"]
        lines.append(
            f"{LABELS[name]:<25}{r['device_per_param']:>8.3f}{r['host_per_param']:>8.3f}{total:>8.3f}   "
            f"{r['predicted_how']:<36}{r['held_ratio']:>10.4f}{total * psi / MIB:>9.2f}"
            f"{r['rss_growth'] / MIB:>10.1f}"
        )
    lines += [
        "  ours: Trainer.held_bytes(); PyTorch: local tensors (DTensor.to_local()) of parameters, gradients",
        "  and optimizer state after optimizer.step(), before zero_grad. ZeroRedundancyOptimizer shards",
        "  whole parameters, unevenly: its largest rank holds a bit more than 8/N. RSS +MiB: growth of the",
        "  process's peak RSS (ru_maxrss, largest rank) while the implementation was built and ran its first",
        "  step, in build order, in one process: the first pays the framework's one-time set-up, later ones",
        "  reuse memory earlier ones freed. The process peak at the end is "
        f"{s['peak_rss'] / MIB:.1f} MiB, most of it",
        "  the framework's own (torch, Python, Gloo), not model states.",
        "",
        "bytes sent per rank per step (ring costs; FORMULAS.md 2Ψ·4 for stages 0-2, 3Ψ·4 for stage 3,",
        "(N-1)/N rounded to 1; exact ring = FORMULAS x (N-1)/N)",
        f"{'implementation':<25}{'sent MiB':>10}{'states MiB':>11}{'/FORMULAS':>10}{'/exact ring':>12}"
        f"{'buckets MiB':>12}{'equal':>7}{'padding B':>10}{'dispatcher':>11}",
    ]
    for name, r in s["impls"].items():
        buckets = _mib(r["bucket_traffic"]) if r["bucket_traffic"] is not None else "-"
        padding = f"{float(r['padding']):.0f}" if "padding" in r else "-"
        agrees = {True: "same", False: "DIFFERS"}.get(r.get("dispatch_agrees"), _mib(r["dispatch_sent"]))
        lines.append(
            f"{LABELS[name]:<25}{_mib(r['sent']):>10}{_mib(r['model_states']):>11}"
            f"{float(r['model_states'] / r['formula']):>10.4f}"
            f"{float(r['model_states'] / r['exact_ring']):>12.6f}"
            f"{buckets:>12}{r.get('buckets_match', '-')!s:>7}{padding:>10}{agrees:>11}"
        )
    lines += [
        "  sent: every collective; states: without the gradient-norm and loss all-reduces (ours: one",
        "  number each; PyTorch: clip_grad_norm_'s, FSDP2's a vector of per-parameter norms, and the loss).",
        "  buckets: our exact count, reduce-scatter + all-gather of each bucket padded to a multiple of N",
        "  (stage 0: all-reduce); equal: states == buckets; padding: what padding adds to buckets, all the",
        "  excess over the exact ring with one micro-batch (none when N divides d_model: every parameter",
        "  holds a multiple of d_model elements). FORMULAS.md counts one reduction per step: with several",
        "  micro-batches ZeRO-2, ZeRO-3 and FSDP2 reduce-scatter (3 and FSDP2 also gather) per micro-batch.",
        "  dispatcher: what the c10d dispatcher saw (ours: whether it equals the torch.distributed calls).",
        "  ZeroRedundancyOptimizer all-reduces gradients (DDP) and broadcasts the updated parameters:",
        "  3(N-1)/N·Ψ·4. FSDP2 keeps the root (embedding, head, final norm) gathered from forward to",
        "  backward, so it gathers the blocks twice and the root once.",
    ]
    lines += ["", "collectives per step (ours: recorded calls; PyTorch: dispatcher), calls x op = MiB sent"]
    for name, r in s["impls"].items():
        parts = [f"{k} {count} = {_mib(sent)}" for k, (count, sent) in sorted(r["by_kind"].items())]
        lines.append(f"  {LABELS[name]:<25}" + ", ".join(parts))
    return "\n".join(lines)


def csv_rows(s: dict) -> tuple[list[str], list[list]]:
    """The CSV header and one summary row per implementation that ran."""
    c = s["config"]
    keys = ("dp", "d_model", "n_layers", "n_heads", "seq_len", "micro_batch", "micro_batches", "vocab")
    keys += ("steps", "bucket_mb")
    fields = ("median_s", "mean_s", "ratio_to_torch_ddp", "first_loss", "last_loss", "device_per_param")
    fields += ("host_per_param", "predicted_device", "predicted_host", "rss_growth", "sent", "model_states")
    fields += ("formula", "exact_ring", "bucket_traffic")
    rows = []
    for name, r in s["impls"].items():
        values = [r.get(k) for k in fields]
        values = ["" if v is None else f"{float(v):.9g}" for v in values]
        rows.append([*(c[k] for k in keys), name, s["n_params"], *values])
    return [*keys, "impl", "n_params", *fields], rows

"""Model-state memory per rank, predicted from a config without processes or real tensors.

`estimate_model_states(cfg, world)` runs the trainer's own composition (dtrain.parallelize) for the first
rank of every pipeline stage on the meta device, with a `parallel.grid.MetaGrid` in place of process
groups, and reads `GradSync.held_bytes()` off the gradient synchronisation it built: the same buckets,
padding, shards, units, offloaded copies and AdamW state as a real run holds, with shapes and no storage.
What the figures are, per wrapper (docs/formulas.md):

  DDP (zero=0)  parameters + gradient buckets (no padding) + AdamW exp_avg/exp_avg_sq per parameter
  ZeRO-1        parameters (padded buckets) + whole padded gradient buckets + moments of this rank's shard
  ZeRO-2        parameters (padded buckets) + gradient shard + moments of the shard
  ZeRO-3        parameter shard + gradient shard + moments (whole unit buffers are freed between uses)
  offload       optimizer: moments and an fp32 master copy of the shard in host memory;
                all (ZeRO-3): the parameter shards in host memory too
  bf16/fp16     2-byte parameters; gradients in parallel.grad_dtype; an fp32 master weight beside the
                moments, whole (DDP) or of the shard (ZeRO), with the optimizer state wherever it lives

ZeRO's N is the shard group: parallel.dp_shard ranks (all of dp x cp by default), not the replicas.

The tests hold these figures to a real `Trainer.held_bytes()` for every layout of the composition matrix.
"""

from __future__ import annotations

import copy

import torch

from dtrain.analysis.activations import activation_bytes
from dtrain.config import Config, ConfigError, load_config
from dtrain.parallelize import Parallelized, parallelize
from dtrain.validation import validate
from parallel.grid import MetaGrid

KINDS = ("params", "grads", "optimizer")
META = torch.device("meta")


def default_world(cfg: Config) -> int:
    """The world a launch of this config would have: dp*tp*pp*cp, or dist.nproc_per_node (else 1) when
    parallel.dp=-1 fills the world."""
    p = cfg.parallel
    if p.dp != -1:
        return p.dp * p.tp * p.pp * p.cp
    return cfg.dist.nproc_per_node or 1


def meta_rank(cfg: Config, rank: int) -> Parallelized:
    """What global `rank` of a validated config's world builds, on the meta device."""
    p = cfg.parallel
    world = p.dp * p.tp * p.pp * p.cp
    return parallelize(
        cfg, MetaGrid(world, rank, tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep, dp_shard=p.dp_shard), META
    )


def first_rank_of_stage(cfg: Config, pp_rank: int) -> int:
    p = cfg.parallel
    return pp_rank * p.dp * p.cp * p.tp  # the grid's first rank of this pipeline stage


def formula_bytes_per_param(cfg: Config, e: int, n: int) -> dict[str, dict[str, float]]:
    """docs/formulas.md, "Memory of model states per rank" (AdamW), with the offload rule: the optimizer
    term (moments plus a master copy of the shard) and for offload=all the parameter shard move to host
    memory. e = bytes per master element (4 for fp32). With train.precision=bf16/fp16 the parameters take
    2 bytes, gradients those of parallel.grad_dtype, and the optimizer holds an e-byte master besides its
    two moments (sharded as they are)."""
    p = cfg.parallel
    mixed = cfg.train.precision != "fp32"
    a = 2 if mixed else e  # parameters
    g = 2 if mixed and p.grad_dtype == "bf16" else e  # gradients
    m = 3 * e if mixed else 2 * e  # optimizer: moments (+ the master weight of 16-bit parameters)
    params, grads, opt = {
        0: (a, g, m),
        1: (a, g, m / n),
        2: (a, g / n, m / n),
        3: (a / n, g / n, m / n),
    }[p.zero]
    out = {where: dict.fromkeys(KINDS, 0.0) for where in ("device", "host")}
    out["device"].update(params=params, grads=grads, optimizer=opt)
    if p.offload != "none":
        out["device"]["optimizer"] = 0.0
        # + the fp32 master copy of the shard (16-bit parameters count theirs already)
        out["host"]["optimizer"] = opt + (0 if mixed else e / n)
    if p.offload == "all":
        out["device"]["params"], out["host"]["params"] = 0.0, params
    return out


def _total(d: dict[str, int | float]) -> float:
    return sum(d.values())


def _formula_line(cfg: Config, n_params: int, e: int, held: dict, n_frozen: int = 0) -> str:
    """Frozen parameters (model.lora, train.freeze) hold only their parameter bytes: the figures per
    parameter are then over the trained ones, with the frozen bytes taken off the estimate first."""
    p = cfg.parallel
    n = p.dp_shard  # ZeRO shards over the shard group (the whole data-parallel group by default)
    f = formula_bytes_per_param(cfg, e, n)
    name = "DDP" if p.zero == 0 else f"ZeRO-{p.zero}"
    if p.offload != "none":
        name += f" offload={p.offload}"
    want = {w: _total(f[w]) for w in f}
    frozen = {w: n_frozen * f[w]["params"] for w in f}
    got = {w: (_total(held[w]) - frozen[w]) / n_params for w in held}
    total = _total(held["device"]) + _total(held["host"])
    extra = total / (n_params * (want["device"] + want["host"]) + _total(frozen)) - 1
    also = f" trained parameters (+ {n_frozen:,} frozen: parameter bytes only)" if n_frozen else " parameters"
    return (
        f"docs/formulas.md {name}, N={n}, {cfg.train.precision} parameters, {e}-byte masters: "
        f"device {want['device']:.4g} + host {want['host']:.4g} B/param; "
        f"estimate device {got['device']:.4g} + host {got['host']:.4g} B/param "
        f"over {n_params:,}{also} (padding to a multiple of N: {extra:+.4%})"
    )


def estimate_model_states(cfg: Config, world: int, communication: bool = True) -> dict:
    """Bytes of parameters, gradients and optimizer states one rank holds after a step (and, with
    `communication`, the bytes it sends per step).

    Returns {"device": {...}, "host": {...}} (pipeline rank 0's figures, as Trainer.held_bytes()), plus
    "params" (this rank's parameter count), "formula" (the docs/formulas.md comparison), "stages" (one entry
    per pipeline rank: every rank of a pipeline stage holds the same), "layout" and "notes". `cfg` is
    validated for `world` here (parallel.dp=-1 is filled in); a bad config raises ConfigError.
    """
    if world < 1:
        raise ConfigError(f"--world={world} must be at least 1")
    cfg = validate(cfg, world)
    p = cfg.parallel
    notes = []
    if cfg.model.qk_norm:
        notes.append("activations leave out model.qk_norm's per-head norms (about 2 q/k widths per token)")
    if cfg.model.moe.num_experts:
        notes.append("activations count mixture-of-experts blocks as dense blocks (routing-dependent)")
    stages = []
    for pp_rank in range(p.pp):
        first_rank = first_rank_of_stage(cfg, pp_rank)
        built = meta_rank(cfg, first_rank)
        params = [q for q in built.model.parameters() if q.requires_grad]
        # e: bytes of a master element (fp32; fp64 in the exactness tests), whatever the parameters hold.
        n_params, e = sum(q.numel() for q in params), max(params[0].element_size(), 4)
        n_frozen = sum(q.numel() for q in built.model.parameters() if not q.requires_grad)
        held = built.grad_sync.held_bytes()
        stages.append(
            {
                "pp_rank": pp_rank,
                "device": held["device"],
                "host": held["host"],
                "params": n_params,
                "frozen_params": n_frozen,
                "element_size": e,
                "formula": _formula_line(cfg, n_params, e, held, n_frozen),
                "activations": activation_bytes(cfg, pp_rank),
                "communication": _communication(cfg, first_rank, built) if communication else {},
            }
        )
    first = stages[0]
    return {
        "device": first["device"],
        "host": first["host"],
        "params": first["params"],
        "formula": first["formula"],
        "stages": stages,
        "layout": {
            "world": world,
            "dp": p.dp,
            "tp": p.tp,
            "pp": p.pp,
            "cp": p.cp,
            "ep": p.ep,
            "sp": p.sp,
            "zero": p.zero,
            "dp_shard": p.dp_shard,
        },
        "offload": p.offload,
        "bucket_mb": p.bucket_mb,
        "precision": cfg.train.precision,
        "notes": notes,
    }


def _communication(cfg: Config, rank: int, built: Parallelized) -> dict:
    """Bytes `rank` (which built `built`) sends per step, by (axis, op), from dtrain.analysis.comm_volume
    (what the ledger measures); {"not_modelled": reason} for what that count does not cover."""
    from dtrain.analysis.comm_volume import NotModelled, predict

    try:
        volume = predict(cfg, rank, built=built)
    except NotModelled as e:
        return {"not_modelled": str(e)}
    return {
        "by_axis_op": {f"{axis} {op}": int(t.sent) for (axis, op), t in volume.tallies().items()},
        "total": int(volume.total_bytes()),
        "estimated": sorted(f"{axis} {op}" for axis, op in volume.estimated),
    }


def peak_device_bytes(stage: dict) -> float:
    """Model states on the device plus the activations held at the peak of a step (temporary buffers,
    the allocator's fragmentation and communication buckets in flight come on top)."""
    return sum(stage["device"].values()) + stage["activations"]["total"]


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_report(est: dict, source: str = "") -> str:
    lay = est["layout"]
    zero = "DDP (zero=0)" if lay["zero"] == 0 else f"ZeRO-{lay['zero']}"
    if lay["zero"] and lay["dp_shard"] < lay["dp"] * lay["cp"]:
        replicas = lay["dp"] * lay["cp"] // lay["dp_shard"]
        zero += f" over dp_shard={lay['dp_shard']} ranks x {replicas} replicas"
    lines = [
        f"dtrain estimate{': ' + source if source else ''} | world {lay['world']} = dp {lay['dp']} x tp "
        f"{lay['tp']} x pp {lay['pp']} x cp {lay['cp']}, ep {lay['ep']} | {zero}, offload={est['offload']}, "
        f"bucket_mb={est['bucket_mb']:g}",
        "model states held per rank after a step (parameters, gradients, AdamW states), then the "
        f"activations kept for backward (dtrain/analysis/activations.py; {est['precision']} figures):",
    ]
    for s in est["stages"]:
        who = "every rank" if lay["pp"] == 1 else f"pipeline stage {s['pp_rank']} (each of its ranks)"
        frozen = f" trained + {s['frozen_params']:,} frozen" if s["frozen_params"] else ""
        lines.append(f"{who}: {s['params']:,} parameters{frozen}")
        lines.append(f"  {'':8}" + "".join(f"{k:>28}" for k in (*KINDS, "total")))
        for where in ("device", "host"):
            row = s[where]
            cells = [*(row[k] for k in KINDS), sum(row.values())]
            lines.append(f"  {where:8}" + "".join(f"{f'{c:,} ({human(c)})':>28}" for c in cells))
        total = sum(s["device"].values()) + sum(s["host"].values())
        lines.append(f"  total   {total:,} bytes ({human(total)})")
        lines.append(f"  {s['formula']}")
        act = s["activations"]
        lines.append(
            f"  activations (device): {human(act['per_microbatch'])} per micro-batch x {act['in_flight']} in "
            f"flight"
            + (f" + {human(act['recompute'])} recomputed block" if act["recompute"] else "")
            + f" = {human(act['total'])}; device peak ~ {human(peak_device_bytes(s))}"
        )
        comm = s["communication"]
        if "not_modelled" in comm:
            lines.append(f"  communication per step: not modelled ({comm['not_modelled']})")
        else:
            parts = [f"{k} {human(v)}" + (" (balanced routing)" if k in comm["estimated"] else "")
                     for k, v in comm["by_axis_op"].items()]  # fmt: skip
            lines.append(f"  sent per step by one rank: {human(comm['total'])}" + (":" if parts else ""))
            lines += [f"    {part}" for part in parts]
    lines += [f"note: {n}" for n in est["notes"]]
    return "\n".join(lines)


def as_json(est: dict, cfg: Config) -> dict:
    """The stable machine-readable form: bytes per rank of each pipeline stage. Every rank of a stage
    holds the same model states and sends the same bytes (counted on its first rank; all-to-all bytes of
    expert parallelism assume balanced routing); `sent` is None where the count is not modelled."""
    from dtrain.model import count_params

    stages = []
    for s in est["stages"]:
        comm = s["communication"]
        sent = {k.replace(" ", "/"): v for k, v in comm.get("by_axis_op", {}).items()}
        device = {k: int(s["device"][k]) for k in KINDS}
        device.update(activations=int(s["activations"]["total"]), peak=int(peak_device_bytes(s)))
        stages.append(
            {
                "stage": s["pp_rank"],
                "device": device,
                "host": {k: int(s["host"][k]) for k in KINDS},
                "sent": sent if "not_modelled" not in comm else None,
            }
        )
    return {"world": est["layout"]["world"], "parameters": count_params(cfg.model)["total"], "stages": stages}


def run(
    config: str | None, overrides: list[str], world: int | None, memory: str | None = None, json: bool = False
) -> str:
    """The CLI's work: load, validate for the world, estimate, format; with `memory` (per rank, e.g.
    80GiB) also the layouts of this world that fit it (dtrain.analysis.suggest)."""
    from dtrain.analysis.suggest import format_suggestions, parse_bytes, suggest_layouts

    cfg = load_config(config, overrides)
    if world is None:
        world = default_world(cfg)
    budget = parse_bytes(memory) if memory is not None else None  # a bad size fails before any work
    est = estimate_model_states(copy.deepcopy(cfg), world)
    if json:
        import json as json_module

        return json_module.dumps(as_json(est, cfg))
    report = format_report(est, config or "")
    if budget is None:
        return report
    return report + "\n" + format_suggestions(suggest_layouts(cfg, world, budget), world, budget)

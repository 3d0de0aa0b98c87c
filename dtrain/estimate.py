"""Model-state memory per rank, predicted from a config without processes or real tensors.

`estimate_model_states(cfg, world)` builds this rank's model chunks on the meta device (shapes and dtypes,
no storage), then replays the bookkeeping of the data-parallel wrapper the trainer would use:

  DDP (zero=0)  parameters + fp32 gradient buckets (no padding) + AdamW exp_avg/exp_avg_sq per parameter
  ZeRO-1        parameters (padded buckets) + whole padded gradient buckets + moments of this rank's shard
  ZeRO-2        parameters (padded buckets) + gradient shard + moments of the shard
  ZeRO-3        parameter shard + gradient shard + moments (whole unit buffers are freed between uses)
  offload       optimizer: moments and an fp32 master copy of the shard in host memory;
                all (ZeRO-3): the parameter shards in host memory too

Buckets are planned exactly as parallel/zero.py does (plan_buckets over the parameters in backward order,
each bucket zero-padded to a multiple of dp; under ZeRO-3 one bucket per unit from Stage.zero3_units), so
the figures equal `Trainer.held_bytes()` after a step, byte for byte.

Layouts: every axis is modelled. A pipeline rank holds its own chunks; a tensor rank holds 1/tp of every
split matrix (dtrain.meta_model builds the rank's model with dtrain.parallel_layers' shapes: heads,
hidden units and the padded vocabulary split, norms, routers and key/value heads fewer than tp
replicated); an expert-parallel rank
holds E/ep experts, whose ZeRO state is sharded over the dp/ep expert-data-parallel ranks; an embedding tied
across stages is a bucket of its own. The tests hold these figures to `Trainer.held_bytes()` for every
layout of the composition matrix.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from dtrain.activations import activation_bytes
from dtrain.config import Config, ConfigError, load_config, validate
from dtrain.meta_model import meta_chunks, stage_view
from dtrain.model import Transformer
from dtrain.stage import Stage
from parallel.data_parallel import plan_buckets
from parallel.zero_experts import split_expert_units

KINDS = ("params", "grads", "optimizer")


def default_world(cfg: Config) -> int:
    """The world a launch of this config would have: dp*tp*pp*cp, or dist.nproc_per_node (else 1) when
    parallel.dp=-1 fills the world."""
    p = cfg.parallel
    if p.dp != -1:
        return p.dp * p.tp * p.pp * p.cp
    return cfg.dist.nproc_per_node or 1


def _empty() -> dict[str, dict[str, int]]:
    return {where: dict.fromkeys(KINDS, 0) for where in ("device", "host")}


def _params(chunks: dict[int, Transformer]) -> list[torch.nn.Parameter]:
    """Stage.parameters(): each chunk's parameters once (a tied head is the embedding), chunk order."""
    return [p for chunk in chunks.values() for p in chunk.parameters() if p.requires_grad]


@dataclass
class RankParams:
    """What one pipeline rank holds, for replaying the data-parallel wrappers' bookkeeping."""

    numel: dict[int, int]  # id(param) -> local elements
    element_size: int
    params: list[torch.nn.Parameter]  # Stage.parameters() order
    units: list  # Stage.zero3_units() (forward order)
    isolated: set[int]  # ids of parameters tied across pipeline stages


def rank_params(cfg: Config, chunks: dict[int, Transformer]) -> RankParams:
    """`chunks`: dtrain.meta_model.meta_chunks, this rank's shapes."""
    stage = stage_view(cfg, chunks)
    numel = {id(p): p.numel() for c in chunks.values() for p in c.parameters()}
    params = _params(chunks)
    return RankParams(
        numel=numel,
        element_size=params[0].element_size(),
        params=params,
        units=Stage.zero3_units(stage) if cfg.parallel.zero == 3 else [(params, [])],
        isolated={id(p) for p in stage.tied_params()},
    )


def _bucket_groups(cfg: Config, rp: RankParams) -> list[tuple[list[int], int]]:
    """(real elements of every flat bucket, the group size it is sharded over) per ZeRO wrapper: one over
    dp, and with ep > 1 one over the dp/ep ranks holding the same experts (parallel.zero_experts)."""
    p = cfg.parallel
    wrappers = [(rp.units, p.dp)]
    if p.ep > 1:
        dense, experts = split_expert_units(rp.units)
        wrappers = [(dense, p.dp), (experts, p.dp // p.ep)]
    out = []
    for units, n in wrappers:
        if p.zero == 3:  # one bucket per unit, in backward order
            numels = [sum(rp.numel[id(q)] for q in params) for params, _ in units][::-1]
        else:  # ZeroDataParallel._plan: backward order, a tied parameter alone
            params = [q for params, _ in units for q in params][::-1]
            kinds = [id(q) if id(q) in rp.isolated else None for q in params]
            sizes = [rp.numel[id(q)] * rp.element_size for q in params]
            plan = plan_buckets(sizes, int(p.bucket_mb * 2**20), kinds)
            numels = [sum(rp.numel[id(params[i])] for i in members) for members in plan]
        out.append((numels, n))
    return out


def zero_bucket_numels(cfg: Config, chunks: dict[int, Transformer]) -> list[int]:
    """Real (unpadded) elements of every flat bucket of the ZeRO wrappers, dense ones first."""
    return [n for numels, _ in _bucket_groups(cfg, rank_params(cfg, chunks)) for n in numels]


def _held(cfg: Config, chunks: dict[int, Transformer]) -> dict[str, dict[str, int]]:
    """What Trainer.held_bytes() reports for a rank holding `chunks`."""
    p = cfg.parallel
    rp = rank_params(cfg, chunks)
    e = rp.element_size
    out = _empty()
    if p.zero == 0:
        grad_size = 8 if rp.params[0].dtype == torch.float64 else 4  # DataParallel's fp32 (fp64) buckets
        numel = sum(rp.numel[id(q)] for q in rp.params)
        out["device"].update(params=numel * e, grads=numel * grad_size, optimizer=2 * numel * e)
        return out
    offload = p.offload in ("optimizer", "all")
    opt_where = "host" if offload else "device"
    for numel, dp in ((n, dp) for numels, dp in _bucket_groups(cfg, rp) for n in numels):
        padded = math.ceil(numel / dp) * dp
        shard = padded // dp
        if p.zero == 3:  # the whole buffer is resized to 0 after use; the shard persists
            out["host" if p.offload == "all" else "device"]["params"] += shard * e
        else:
            out["device"]["params"] += padded * e
        out["device"]["grads"] += (padded if p.zero == 1 else shard) * e
        out[opt_where]["optimizer"] += 2 * shard * e + (shard * e if offload else 0)
    return out


def formula_bytes_per_param(cfg: Config, e: int, n: int) -> dict[str, dict[str, float]]:
    """FORMULAS.md, "Memory of model states per rank" (fp32 parameters and AdamW), with the offload rule:
    the optimizer term (moments plus a master copy of the shard) and for offload=all the parameter shard
    move to host memory. e = bytes per element (4 for fp32)."""
    p = cfg.parallel
    params, grads, opt = {
        0: (e, e, 2 * e),
        1: (e, e, 2 * e / n),
        2: (e, e / n, 2 * e / n),
        3: (e / n, e / n, 2 * e / n),
    }[p.zero]
    out = {where: dict.fromkeys(KINDS, 0.0) for where in ("device", "host")}
    out["device"].update(params=params, grads=grads, optimizer=opt)
    if p.offload != "none":
        out["device"]["optimizer"] = 0.0
        out["host"]["optimizer"] = opt + e / n  # + the fp32 master copy of the shard
    if p.offload == "all":
        out["device"]["params"], out["host"]["params"] = 0.0, params
    return out


def _total(d: dict[str, int | float]) -> float:
    return sum(d.values())


def _formula_line(cfg: Config, n_params: int, e: int, held: dict) -> str:
    p = cfg.parallel
    f = formula_bytes_per_param(cfg, e, p.dp)
    name = "DDP" if p.zero == 0 else f"ZeRO-{p.zero}"
    if p.offload != "none":
        name += f" offload={p.offload}"
    want = {w: _total(f[w]) for w in f}
    got = {w: _total(held[w]) / n_params for w in held}
    extra = (_total(held["device"]) + _total(held["host"])) / (n_params * (want["device"] + want["host"])) - 1
    return (
        f"FORMULAS.md {name}, N={p.dp}, {e}-byte parameters: device {want['device']:.4g} + host "
        f"{want['host']:.4g} B/param; estimate device {got['device']:.4g} + host {got['host']:.4g} B/param "
        f"over {n_params:,} parameters (padding to a multiple of N: {extra:+.4%})"
    )


def estimate_model_states(cfg: Config, world: int) -> dict:
    """Bytes of parameters, gradients and optimizer states one rank holds after a step.

    Returns {"device": {...}, "host": {...}} (pipeline rank 0's figures, as Trainer.held_bytes()), plus
    "params" (this rank's parameter count), "formula" (the FORMULAS.md comparison), "stages" (one entry
    per pipeline rank: every rank of a pipeline stage holds the same), "layout" and "notes". `cfg` is
    validated for `world` here (parallel.dp=-1 is filled in); a bad config raises ConfigError.
    """
    if world < 1:
        raise ConfigError(f"--world={world} must be at least 1")
    cfg = validate(cfg, world)
    p = cfg.parallel
    notes = []
    stages = []
    for pp_rank in range(p.pp):
        chunks = meta_chunks(cfg, pp_rank)
        rp = rank_params(cfg, chunks)
        n_params, e = sum(rp.numel[id(q)] for q in rp.params), rp.element_size
        held = _held(cfg, chunks)
        first_rank = pp_rank * p.dp * p.cp * p.tp  # the grid's first rank of this pipeline stage
        stages.append(
            {
                "pp_rank": pp_rank,
                "device": held["device"],
                "host": held["host"],
                "params": n_params,
                "element_size": e,
                "formula": _formula_line(cfg, n_params, e, held),
                "activations": activation_bytes(cfg, pp_rank),
                "communication": _communication(cfg, first_rank),
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
        },
        "offload": p.offload,
        "bucket_mb": p.bucket_mb,
        "notes": notes,
    }


def _communication(cfg: Config, rank: int) -> dict:
    """Bytes `rank` sends per step, by (axis, op), from dtrain.comm_volume (what the ledger measures);
    {"not_modelled": reason} for what that count does not cover."""
    from dtrain.comm_volume import NotModelled, predict

    try:
        volume = predict(cfg, rank)
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
    lines = [
        f"dtrain estimate{': ' + source if source else ''} | world {lay['world']} = dp {lay['dp']} x tp "
        f"{lay['tp']} x pp {lay['pp']} x cp {lay['cp']}, ep {lay['ep']} | {zero}, offload={est['offload']}, "
        f"bucket_mb={est['bucket_mb']:g}",
        "model states held per rank after a step (parameters, gradients, AdamW states), then the "
        "activations kept for backward (dtrain/activations.py; fp32 figures):",
    ]
    for s in est["stages"]:
        who = "every rank" if lay["pp"] == 1 else f"pipeline stage {s['pp_rank']} (each of its ranks)"
        lines.append(f"{who}: {s['params']:,} parameters")
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


def run(config: str | None, overrides: list[str], world: int | None, memory: str | None = None) -> str:
    """The CLI's work: load, validate for the world, estimate, format; with `memory` (per rank, e.g.
    80GiB) also the layouts of this world that fit it (dtrain.suggest)."""
    from dtrain.suggest import format_suggestions, parse_bytes, suggest_layouts

    cfg = load_config(config, overrides)
    if world is None:
        world = default_world(cfg)
    budget = parse_bytes(memory) if memory is not None else None  # a bad size fails before any work
    report = format_report(estimate_model_states(copy.deepcopy(cfg), world), config or "")
    if budget is None:
        return report
    return report + "\n" + format_suggestions(suggest_layouts(cfg, world, budget), world, budget)

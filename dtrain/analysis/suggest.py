"""Layouts that fit a per-GPU memory budget, from the config alone (`dtrain estimate --memory 80GiB`).

Every layout of the world the config validates for is estimated (model states on the device plus the
activations of the micro-batches in flight, dtrain.analysis.estimate and dtrain.analysis.activations) and
kept when its most loaded pipeline stage fits. They are ranked by what they cost in speed, cheapest
first: plain data parallelism before tensor and pipeline splits (which communicate per layer and idle in
the bubble), lower ZeRO stages before higher (stage 3 gathers every parameter twice per step), no activation
recomputation before recomputation, and no offload before offload.
"""

from __future__ import annotations

import copy
import itertools
import re

from dtrain.analysis.estimate import estimate_model_states, human, peak_device_bytes
from dtrain.config import Config, ConfigError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"--memory={text!r} is not a size; write it like 80GiB, 40GB or 8e9")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_overrides(cfg: Config, world: int) -> list[dict]:
    m = cfg.model
    experts = m.moe.num_experts
    out = []
    for tp, pp in itertools.product(_divisors(world), _divisors(world)):
        if world % (tp * pp) or m.n_heads % tp or pp > m.n_layers:
            continue
        dp = world // (tp * pp)
        eps = [e for e in _divisors(dp) if experts and experts % e == 0] or [1]
        for ep, zero, ckpt in itertools.product(eps, (0, 1, 2, 3), (False, True)):
            for offload in ("none", "optimizer") if zero else ("none",):
                out.append(
                    {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "sp": tp > 1, "zero": zero, "offload": offload,
                     "activation_checkpointing": ckpt}
                )  # fmt: skip
    return out


def suggest_layouts(cfg: Config, world: int, memory: int, top: int = 8) -> list[dict]:
    """Layouts of `world` ranks whose busiest rank needs at most `memory` bytes, cheapest first."""
    fits = []
    for o in candidate_overrides(cfg, world):
        trial = copy.deepcopy(cfg)
        for key in ("tp", "pp", "dp", "ep", "sp", "zero", "offload"):
            setattr(trial.parallel, key, o[key])
        trial.train.activation_checkpointing = o["activation_checkpointing"]
        try:
            est = estimate_model_states(trial, world)
        except ConfigError:
            continue  # this layout cannot run this config (micro-batches, heads, ...)
        need = max(peak_device_bytes(s) for s in est["stages"])
        if need <= memory:
            cost = (o["tp"] * o["pp"], o["zero"], o["activation_checkpointing"], o["offload"] != "none")
            fits.append({**o, "bytes": need, "cost": cost})
    fits.sort(key=lambda f: (f["cost"], f["bytes"]))
    return fits[:top]


def format_suggestions(fits: list[dict], world: int, memory: int) -> str:
    if not fits:
        return (
            f"no layout of {world} ranks fits {human(memory)} per rank; use more ranks, a smaller "
            f"train.micro_batch_size, or a smaller model"
        )
    lines = [f"layouts of {world} ranks that fit {human(memory)} per rank, cheapest first:"]
    for f in fits:
        keys = " ".join(
            f"parallel.{k}={v}".replace("True", "true").replace("False", "false")
            for k, v in f.items()
            if k in ("dp", "tp", "pp", "ep", "sp", "zero", "offload")
        )
        ckpt = " train.activation_checkpointing=true" if f["activation_checkpointing"] else ""
        lines.append(f"  {human(f['bytes']):>11}  {keys}{ckpt}")
    return "\n".join(lines)

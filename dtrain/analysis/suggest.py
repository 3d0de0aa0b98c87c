"""Layouts that fit a per-GPU memory budget, from the config alone (`dtrain estimate --memory 80GiB`).

Every layout of the world the config validates for is estimated (model states on the device plus the
activations of the micro-batches in flight, dtrain.analysis.estimate and dtrain.analysis.activations) and
kept when its most loaded pipeline stage fits. They are ranked by what they cost in speed, cheapest
first: plain data parallelism before tensor and pipeline splits (which communicate per layer and idle in
the bubble), lower ZeRO stages before higher (stage 3 gathers every parameter twice per step), no
activation recomputation before recomputation, and no offload before offload; equal ones by memory.

Each layout is printed as the complete override list that reproduces its figure on top of the same config:
the overrides the estimate was given (those the layout does not replace) and every key the search varies
(LAYOUT_KEYS), so that nothing is left to whatever the config says, such as its activation checkpointing.
"""

from __future__ import annotations

import copy
import itertools
import re

from dtrain.analysis.activations import activation_bytes
from dtrain.analysis.estimate import estimate_model_states, human, peak_device_bytes
from dtrain.config import Config, ConfigError
from dtrain.validation import validate

# A size needs its unit: a bare 80 could mean bytes, GB or GiB, and read as bytes it fits nothing.
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
FORMS = "write it with a unit, like 80GiB, 40GB or 512MiB (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def parse_bytes(text: str, option: str = "--memory") -> int:
    """`80GiB`, `40 GB`, `1.5TiB`, `512MiB` -> bytes (units case-insensitive; 1 GB = 10**9, 1 GiB = 2**30);
    errors name `option`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match and not match.group(2):
        raise ConfigError(f"{option}={text} has no unit; {FORMS}")
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"{option}={text!r} is not a size; {FORMS}")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"{option}={text} must be more than 0 bytes")
    return size


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


# What a layout sets, in the order it is printed: every key the search varies, so that its overrides on
# top of the same config reproduce the figure whatever the config says for them.
LAYOUT_KEYS = {
    "dp": "parallel.dp", "tp": "parallel.tp", "pp": "parallel.pp", "ep": "parallel.ep", "sp": "parallel.sp",
    "zero": "parallel.zero", "offload": "parallel.offload",
    "activation_checkpointing": "train.activation_checkpointing",
}  # fmt: skip
ORDER = (
    "fastest first by expected cost: fewer tensor x pipeline ranks (tp*pp), then a lower ZeRO stage, then no "
    "activation recomputation, then no offload; equal ones by memory, least first"
)


def suggest_layouts(cfg: Config, world: int, memory: int, top: int | None = None) -> list[dict]:
    """Layouts of `world` ranks whose busiest rank needs at most `memory` bytes, in ORDER (the first `top`,
    or all)."""
    fits = []
    # Model states do not depend on activation checkpointing, only the activations do: the meta-device
    # build (most of the search's time) is made once for the two.
    stages_of = {}
    for o in candidate_overrides(cfg, world):
        trial = copy.deepcopy(cfg)
        for key in ("tp", "pp", "dp", "ep", "sp", "zero", "offload"):
            setattr(trial.parallel, key, o[key])
        trial.train.activation_checkpointing = o["activation_checkpointing"]
        states = tuple(v for k, v in o.items() if k != "activation_checkpointing")
        try:
            trial = validate(trial, world)
            if states not in stages_of:  # memory decides the fit: no communication count
                stages_of[states] = estimate_model_states(trial, world, communication=False)["stages"]
        except ConfigError:
            continue  # this layout cannot run this config (micro-batches, heads, ...)
        need = max(
            peak_device_bytes({**s, "activations": activation_bytes(trial, s["pp_rank"])})
            for s in stages_of[states]
        )
        if need <= memory:
            cost = (o["tp"] * o["pp"], o["zero"], o["activation_checkpointing"], o["offload"] != "none")
            fits.append({**o, "bytes": need, "cost": cost})
    fits.sort(key=lambda f: (f["cost"], f["bytes"]))
    return fits if top is None else fits[:top]


def layout_overrides(fit: dict, base: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The complete override list of a layout: the `base` overrides it does not replace, then its own."""
    own = [f"{name}={str(fit[key]).lower()}" for key, name in LAYOUT_KEYS.items()]
    replaced = set(LAYOUT_KEYS.values())
    return [o for o in base if o.partition("=")[0].strip() not in replaced] + own


def format_suggestions(
    fits: list[dict],
    world: int,
    memory: int,
    top: int = 8,
    config: str = "CONFIG",
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """`fits` (all of them, in ORDER): how many fit, the first `top` (0: all) with the override list that
    reproduces each figure on top of `config` (`overrides` are the ones the estimate was given)."""
    if not fits:
        return (
            f"no layout of {world} ranks fits {human(memory)} per rank; use more ranks, a smaller "
            f"train.micro_batch_size, or a smaller model"
        )
    shown = fits[:top] if top else fits
    more = len(fits) - len(shown)
    rest = (
        f"; the first {len(shown)} are shown, {more} more fit (--top N shows N, --top 0 all)" if more else ""
    )
    lines = [
        f"layouts of {world} ranks that fit {human(memory)} per rank: {len(fits)}{rest}.",
        f"Listed {ORDER}.",
        f"Each line: the busiest rank's device peak, then the overrides that reproduce it: "
        f"dtrain estimate {config} OVERRIDES",
    ]
    for f in shown:
        lines.append(f"  {human(f['bytes']):>11}  {' '.join(layout_overrides(f, overrides))}")
    return "\n".join(lines)


def suggestions(
    config: str | None, overrides: list[str], world: int | None, memory: int, top: int = 8
) -> str:
    """`dtrain estimate --memory`: the layouts of the world the estimate reports on that fit `memory`."""
    from dtrain.analysis.estimate import default_world
    from dtrain.config import load_config

    cfg = load_config(config, overrides)
    world = default_world(cfg) if world is None else world
    fits = suggest_layouts(cfg, world, memory)
    return format_suggestions(fits, world, memory, top, config or "CONFIG", overrides)

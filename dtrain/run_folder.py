"""A run's folder: which checkpoint a run resumes from and whether it may (the same model shape and
frozen base), and that a fresh run never writes over an earlier one's outputs. All of it runs before any
process group exists, so a refusal is one line and nothing is written."""

from __future__ import annotations

import os

import torch

from dtrain.checkpoint import (
    CheckpointError,
    check_base,
    fsync_dir,
    latest_valid,
    list_checkpoints,
    load_state,
    verify,
)
from dtrain.resilience import flatten_config


def _model_difference(saved: dict, wanted: dict) -> str | None:
    """How two model configs differ in a way that changes parameter names or shapes, as 'model.x=a in
    the checkpoint, b here' (None if every parameter would load). Built on PyTorch's meta device: no
    memory, no weights."""
    from dtrain.config import config_from_dict
    from dtrain.model import Transformer

    def shapes(model_cfg: dict) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = Transformer(config_from_dict({"model": model_cfg}).model)
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    if shapes(saved) == shapes(wanted):
        return None
    a, b = flatten_config(saved, "model."), flatten_config(wanted, "model.")
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}={a.get(k)!r} in the checkpoint, {b.get(k)!r} here" for k in keys[:3]) or "?"


def resume_source(cfg, warn=print) -> str | None:
    """The checkpoint a run resumes from: `run.resume=PATH` (verified), the newest one in run.out_dir that
    verifies for `run.resume=true` (corrupted newer ones reported through `warn`), None for a fresh run
    or when there is none yet."""
    resume = cfg.run.resume
    if resume is False:
        return None
    if isinstance(resume, str):
        verify(resume)
        return resume
    return latest_valid(cfg.run.out_dir, warn=warn)


def check_resume(cfg, warn=print) -> str | None:
    """Before any process group: the checkpoint this run would resume from (resume_source, returned) must
    come from the same model shape, or the run stops with one line naming that checkpoint and the model
    keys that differ (restore() checks every tensor again; this only reads state.json, so it costs
    nothing beyond the verification resuming does anyway)."""
    from dtrain.config import ConfigError, to_dict

    path = resume_source(cfg, warn)
    if path is None:
        return None
    try:
        saved = load_state(path)["config"]["model"]
        differs = _model_difference(saved, to_dict(cfg)["model"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return path  # from another dtrain version: restore() decides, tensor by tensor
    if differs:
        raise CheckpointError(
            f"{path} was saved from another model shape ({differs}); set the same model.* values to "
            f"resume it, or use another run.out_dir"
        )
    check_base(path, load_state(path).get("base"), cfg)
    return path


def run_complete(path: str, steps: int) -> str | None:
    """The line to end with when resuming from `path` leaves nothing to train (None if it does not)."""
    step = int(load_state(path).get("step", 0))
    if step < steps:
        return None
    return (
        f"dtrain: nothing to do: {path} is at step {step} and train.steps={steps}, so this run is complete "
        f"(raise train.steps to train further)"
    )


# --- output folders: a fresh run never writes over an earlier one -------------------------------------------

METRICS_FILE = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event files, beside metrics.jsonl
ASIDE_PREFIX = "replaced-"


def earlier_outputs(out_dir: str) -> list[str]:
    """What an earlier run left in `out_dir` that a new run would write over or mix with: its finished
    checkpoints, metrics.jsonl and TensorBoard event files (folder-relative names)."""
    if not os.path.isdir(out_dir):
        return []
    found = [os.path.relpath(c, out_dir) for c in list_checkpoints(out_dir)]
    names = sorted(os.listdir(out_dir))
    found += [n for n in names if n == METRICS_FILE or n.startswith(EVENTS_PREFIX)]
    return found


def check_out_dir(cfg) -> None:
    """Before any process group or write: a fresh run (run.resume=false) into a run.out_dir that holds an
    earlier run's outputs stops with one line naming the folder and the ways out, unless run.overwrite
    (then cli moves them aside with move_aside)."""
    from dtrain.config import ConfigError

    r = cfg.run
    if r.overwrite and r.resume is not False:
        raise ConfigError(
            f"run.overwrite=true starts afresh, run.resume={str(r.resume).lower()} continues a run: set one"
        )
    found = earlier_outputs(r.out_dir)
    if r.resume is not False or r.overwrite or not found:
        return
    ckpts = [f for f in found if f.startswith("checkpoints")]
    what = [f"checkpoints up to {os.path.basename(ckpts[-1])}"] if ckpts else []
    what += [f for f in found if f == METRICS_FILE]
    what += ["TensorBoard event files"] if any(f.startswith(EVENTS_PREFIX) for f in found) else []
    raise ConfigError(
        f"run.out_dir={r.out_dir} already holds an earlier run's outputs ({', '.join(what)}); continue that "
        f"run with run.resume=true, write this one elsewhere with another run.out_dir, or set "
        f"run.overwrite=true to move the old outputs aside into {os.path.join(r.out_dir, ASIDE_PREFIX)}"
        f"<date>-<time>/ (nothing is deleted)"
    )


def move_aside(out_dir: str, now: float | None = None) -> str | None:
    """run.overwrite=true: move the earlier run's outputs (the checkpoints folder, metrics.jsonl, event
    files) into `out_dir/replaced-YYYYmmdd-HHMMSS[-N]/`, keeping their names; return that folder, or None
    if there was nothing to move. Renames within one folder: nothing is copied or deleted."""
    import time

    if not earlier_outputs(out_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    aside = os.path.join(out_dir, ASIDE_PREFIX + stamp)
    n = 1
    while os.path.exists(aside):  # a second overwrite within the same second
        n += 1
        aside = os.path.join(out_dir, f"{ASIDE_PREFIX}{stamp}-{n}")
    os.makedirs(aside)
    for name in sorted(os.listdir(out_dir)):
        if name in ("checkpoints", METRICS_FILE) or name.startswith(EVENTS_PREFIX):
            os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    fsync_dir(out_dir)
    return aside

"""Checkpoints: `run.out_dir/checkpoints/step_<N>`, one folder per checkpoint whatever the layout.

    model.pt       canonical parameter name -> full tensor (the single-process shapes)
    optimizer.pt   "<name>/exp_avg", "<name>/exp_avg_sq", "<name>/step" -> tensor
    state.json     step, loss-scaler state, the resolved config and the layout that wrote it
    manifest.json  sha256 and size of every file above; written last

Written atomically: everything goes to `step_<N>.tmp`, is fsynced, the manifest is written, and only then
is the folder renamed to `step_<N>`; a crash at any point leaves either no `step_<N>` or a complete one.
Loading verifies every checksum first and reads tensors with `torch.load(weights_only=True)`, which
refuses to unpickle anything but tensors and plain containers, so a checkpoint cannot execute code.
Tensors are stored by canonical name and full shape, so a later layout can take its own slices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from torch import nn

from dtrain.resilience import first_error
from parallel.sharding import gather_full, sharding_of

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted; the message names the file."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _canonical(p: torch.Tensor, value: torch.Tensor, groups: dict) -> torch.Tensor:
    """`value` (the parameter or a tensor shaped like it) as its canonical full tensor, on the CPU."""
    s = sharding_of(p)
    if s.split_dim is not None and tuple(value.shape) == tuple(p.shape):
        value = gather_full(value.detach(), s, groups[s.group])  # collective over that group
    return value.detach().to("cpu", copy=True)


def canonical_model_state(
    model: nn.Module, groups: dict, masters: dict | None = None, frozen: bool = True
) -> dict[str, torch.Tensor]:
    """Every parameter this rank's model part holds, except copies another stage saves; a parameter with
    an fp32 master weight in `masters` (16-bit training) is saved as that master; without `frozen`, only
    the trained ones (a checkpoint's: frozen ones come from the base, `base_identity`)."""
    masters = masters or {}
    return {
        name: _canonical(p, masters.get(p, p), groups)
        for name, p in model.named_parameters()
        if not sharding_of(p).duplicate_of and (frozen or p.requires_grad)
    }


def base_identity(cfg) -> dict | None:
    """What the frozen parameters of a run come from, which its checkpoints name instead of holding them:
    the model.init_from folder with a fingerprint of its files, or the seed of random initial weights.
    None when nothing is frozen (the checkpoint then holds every parameter)."""
    if not cfg.model.lora.rank and not cfg.train.freeze:
        return None
    if cfg.model.init_from:
        folder = cfg.model.init_from
        return {"init_from": os.path.abspath(folder), "fingerprint": fingerprint(folder)}
    return {"seed": cfg.train.seed}


def fingerprint(folder: str) -> str:
    """sha256 of a Hugging Face folder's config.json and, per safetensors file, its size, its header
    (every tensor's name, dtype, shape and offsets) and its first MiB of values: cheap on a large model,
    and any other model, or the same one trained further, differs."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == "config.json":
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith(".safetensors"):
            with open(path, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
                h.update(f"{name}/{os.path.getsize(path)}/".encode())
                h.update(f.read(header + (1 << 20)))
    return h.hexdigest()


def _base_line(base: dict | None) -> str:
    if base is None:
        return "no frozen base"
    return f"model.init_from={base['init_from']}" if "init_from" in base else f"train.seed={base['seed']}"


def check_base(path: str, saved: dict | None, cfg) -> None:
    """A checkpoint of a run with frozen parameters applies to one base only: the same must be built."""
    here = base_identity(cfg)
    if saved == here:
        return
    same_source = saved and here and saved.get("init_from") == here.get("init_from")
    what = "whose files have changed since" if same_source else f"here {_base_line(here)}"
    raise CheckpointError(
        f"{path} trained adapters or unfrozen parameters on {_base_line(saved)}, {what}; resume with the "
        f"base it was trained on"
    )


def optimizer_state(model: nn.Module, state: dict, groups: dict) -> dict[str, torch.Tensor]:
    """AdamW state keyed by canonical parameter name instead of the optimizer's positional index; the
    moments are shaped like their parameter, so they are gathered like it."""
    flat = {}
    for name, p in model.named_parameters():
        if sharding_of(p).duplicate_of:
            continue
        for key, value in state.get(p, {}).items():
            flat[f"{name}/{key}"] = _canonical(p, value, groups) if torch.is_tensor(value) else value
    return flat


def _attempt(action) -> str | None:
    """Run one rank's share of a save; its error as one line (None on success). Any exception counts,
    not only OSError: torch.save reports a failed write as RuntimeError, and a rank that raised while the
    others wait in the next collective would hang the job."""
    try:
        action()
        return None
    except Exception as e:
        return (str(e).splitlines() or [type(e).__name__])[0]


def _finalise(tmp: str, final: str, root: str, step: int, extra_state: dict) -> None:
    """Rank 0: state.json, then the manifest, then the rename that publishes the checkpoint."""
    state = {"format": FORMAT_VERSION, "step": step, **extra_state}
    _write_file(os.path.join(tmp, "state.json"), lambda f: f.write(json.dumps(state, indent=1).encode()))
    files = {
        name: {"sha256": _sha256(os.path.join(tmp, name)), "bytes": os.path.getsize(os.path.join(tmp, name))}
        for name in sorted(os.listdir(tmp))
    }
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    _write_file(
        os.path.join(tmp, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode())
    )
    fsync_dir(tmp)
    # Saving a step that exists already: move the old one aside first, so some complete step_<N> is on
    # disk at every moment, and put it back if the new one cannot take its place.
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(final):
            os.replace(old, final)
        raise
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: str) -> None:
    """Rename first, then delete: a crash mid-delete leaves a `.deleting` folder that nothing reads,
    never a half-deleted step_<N> that looks like a checkpoint."""
    trash = path + ".deleting"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save(
    out_dir: str,
    step: int,
    model: nn.Module,
    optimizer: dict,
    extra_state: dict,
    keep: int,
    *,
    gathers: bool,
    is_writer: bool,
    part: int,
    groups: dict,
    masters: dict | None = None,
) -> str:
    """Collective over the world: every rank calls it. Ranks with `gathers` assemble canonical tensors
    from the shards of their groups (one data-parallel replica suffices); the `is_writer` rank among
    them writes part `part` (its pipeline stage's parameters); rank 0 finalises.

    A failure on any rank (a full disk, a read-only folder) is agreed by all ranks at the end of each
    phase (`first_error`, which also serves as the barrier), so every rank raises the same one-line
    CheckpointError; the unfinished `.tmp` folder is removed and earlier checkpoints are left intact."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step}")
    tmp = final + ".tmp"
    rank = dist.get_rank()

    def agree(error: str | None) -> None:
        error = first_error(error)
        if error is None:
            return
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [os.path.basename(c) for c in list_checkpoints(out_dir)]
        kept = f"{previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(
            f"could not write checkpoint {final} ({error}); {kept}; fix the cause (free disk space, "
            f"permissions) and rerun with run.resume=true"
        )

    def prepare() -> None:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        os.makedirs(tmp)

    agree(_attempt(prepare) if rank == 0 else None)
    if gathers:
        model_state = canonical_model_state(model, groups, masters, frozen=False)
        optim_state = optimizer_state(model, optimizer, groups)

    def write_part() -> None:
        _write_file(os.path.join(tmp, f"model_pp{part}.pt"), lambda f: torch.save(model_state, f))
        _write_file(os.path.join(tmp, f"optimizer_pp{part}.pt"), lambda f: torch.save(optim_state, f))

    agree(_attempt(write_part) if is_writer else None)
    agree(_attempt(lambda: _finalise(tmp, final, root, step, extra_state)) if rank == 0 else None)
    if rank == 0 and keep > 0:
        # Count only checkpoints up to this one: a newer folder (left by a run this one resumed behind)
        # must never make retention delete the checkpoint just written.
        older = [c for c in list_checkpoints(out_dir) if _step_of(c) <= step]
        for path in older[:-keep]:
            _attempt(lambda path=path: _remove(path))  # best effort: the new checkpoint is complete
    dist.barrier()
    return final


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def list_checkpoints(out_dir: str) -> list[str]:
    """Finished checkpoint folders (no .tmp), oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def verify(path: str) -> dict:
    """Check the manifest and every checksum; return the manifest. Raises CheckpointError.

    Every file in the folder must be listed, so nothing unverified is ever loaded, and the step in the
    manifest must match the folder's name (a renamed copy would resume at the wrong step)."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path} has no manifest.json: not a checkpoint, or its save did not finish")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest_path} is not valid JSON (corrupted checkpoint)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path} has format {found}; this dtrain reads {FORMAT_VERSION}")
    files = manifest.get("files")
    well_formed = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
        for m in files.values()
    )
    if not well_formed or "state.json" not in files:
        raise CheckpointError(f"{manifest_path} does not list the checkpoint's files (corrupted checkpoint)")
    named = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != manifest.get("step"):
        raise CheckpointError(
            f"{path} holds step {manifest.get('step')} according to its manifest; the folder was renamed"
        )
    for name, meta in files.items():
        file = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (corrupted checkpoint)")
        if os.path.getsize(file) != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(
                f"{file} does not match its checksum in manifest.json (corrupted or truncated)"
            )
    unlisted = sorted(set(os.listdir(path)) - set(files) - {"manifest.json"})
    if unlisted:
        raise CheckpointError(f"{path} holds {unlisted[0]}, which manifest.json does not list; remove it")
    return manifest


def latest_valid(out_dir: str, warn=print) -> str | None:
    """The newest checkpoint that verifies; corrupted newer ones are reported and passed over."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    return None


def load_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """One tensor file, read with weights_only=True: anything but tensors and plain containers (a pickled
    object that would run code) is refused with a one-line CheckpointError."""
    file = os.path.join(path, name)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights only" in first.lower():  # torch's text goes on to suggest weights_only=False: never
            first = "it holds pickled objects other than tensors, which could run code"
        raise CheckpointError(f"{file} is not a tensor file dtrain can load safely: {first}") from None


def load_parts(path: str, kind: str) -> dict[str, torch.Tensor]:
    """Merge the per-stage files `<kind>_pp<k>.pt` of a checkpoint (canonical names never collide)."""
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.startswith(f"{kind}_pp") and name.endswith(".pt"):
            merged.update(load_tensors(path, name))
    if not merged:
        raise CheckpointError(f"{path} holds no {kind}_pp*.pt files")
    return merged


def load_state(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def restore(path: str, model: nn.Module) -> tuple[dict, dict]:
    """Load a verified checkpoint into this rank's model; returns state.json and the AdamW state of this
    rank's parameters (its slices of the canonical moments), for GradSync.load_state_dict."""
    optimizer: dict = {}
    model_state = load_parts(path, "model")
    optim_by_param: dict[str, dict] = {}
    for key, value in load_parts(path, "optimizer").items():
        name, field = key.rsplit("/", 1)
        optim_by_param.setdefault(name, {})[field] = value
    for own_name, p in model.named_parameters():
        s = sharding_of(p)
        name = s.duplicate_of or own_name
        if name not in model_state:
            if not p.requires_grad:
                continue  # frozen: built from the base the checkpoint names (check_base)
            raise CheckpointError(f"{path} has no parameter '{name}': it was saved from another model")
        full = model_state[name]
        if tuple(full.shape) != tuple(s.full_shape):
            raise CheckpointError(
                f"{path}: parameter '{name}' has shape {tuple(full.shape)}, the model expects "
                f"{tuple(s.full_shape)}; the checkpoint comes from another model shape"
            )
        p.copy_(s.take(full))  # a 16-bit parameter: the saved fp32 weight rounded to nearest
        if name in optim_by_param:
            # Moments are canonical like the parameter: take this rank's slice. AdamW keeps its step
            # counter on the CPU unless capturable. The saved weight is also the master of a 16-bit
            # parameter (GradSync.load_state_dict).
            optimizer[p] = {
                k: v if k == "step" else s.take(v).to(p.device).clone()
                for k, v in optim_by_param[name].items()
            }
            optimizer[p]["master"] = s.take(full).to(p.device).clone()
    return load_state(path), optimizer


def model_tensors(path: str) -> dict[str, torch.Tensor]:
    """The canonical tensors of a checkpoint's whole model: what it holds, and where it names a base
    (frozen parameters not saved), that base's parameters built again from model.init_from or the seed."""
    from dtrain.config import config_from_dict
    from dtrain.hf import HFWeights
    from dtrain.model import Transformer, freeze, init_weights

    tensors = load_parts(path, "model")
    state = load_state(path)
    if not state.get("base"):
        return tensors
    cfg = config_from_dict(state["config"])
    check_base(path, state["base"], cfg)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    freeze(model, cfg.train.freeze)
    model.to_empty(device="cpu")
    weights = HFWeights(cfg.model.init_from) if cfg.model.init_from else None
    init_weights(model, cfg.train.seed, weights.read if weights else None)
    if weights:
        weights.close()
    full = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    return {**full, **tensors}

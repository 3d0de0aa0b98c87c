"""What keeps a multi-rank run honest when something goes wrong: ranks agreeing on an error, ranks agreeing
on what they run, and collective failures named by the training phase they interrupted.

- `first_error`: every rank says whether its part of a collective operation (writing its checkpoint file)
  failed; all learn the first failure's message, so all raise the same error instead of some ranks
  waiting forever in the next barrier.
- `check_ranks_agree`: at start-up, every rank all-gathers a fingerprint of its resolved config, of the
  dtrain/parallel/launch source files and of its torch and Python versions; a rank that differs from rank
  0 stops the run with one line naming that rank and the first key or file that differs.
- `CollectivePhases`: a collective that times out (after `dist.timeout_s`) or loses its peer
  raises a `CollectiveError` naming the phase it belonged to, the process group and its ranks, and the
  step. Gloo's own message names only a buffer and a socket. Covered: every collective the trainer issues
  in a step (forward/backward, gradient reduction, norm, optimizer, loss), evaluation, checkpoint save
  and load, and this start-up check. Not covered: NCCL, whose watchdog aborts the process itself and logs
  the operation type and sequence number but cannot reach our phase names; a rank that hangs outside any
  collective (its peers time out in theirs and name it; the hung rank is killed by torchrun); the
  rendezvous, which torchrun bounds with its own timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

_MESSAGE_BYTES = 1024  # an error line travels between ranks in a fixed-size buffer


# --- one error, agreed by every rank ------------------------------------------------------------------


def _device(group=None) -> torch.device:
    """Where a collective's tensors must live: NCCL moves CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_tensor(data: bytes, size: int, device: torch.device) -> torch.Tensor:
    buf = torch.zeros(size, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.to(device)


def first_error(message: str | None, group: dist.ProcessGroup | None = None) -> str | None:
    """Collective: `message` is this rank's error (None if it succeeded). Returns the message of the
    lowest failing rank, prefixed with that rank, on every rank; None when every rank succeeded. Costs one
    small all-reduce when nothing failed, so it can stand in for a barrier."""
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    device = _device(group)
    failed = torch.tensor([me if message is not None else world], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN, group=group)
    first = int(failed)
    if first == world:
        return None
    raw = message.encode("utf-8", "replace")[:_MESSAGE_BYTES] if me == first else b""
    buf = _to_tensor(raw, _MESSAGE_BYTES, device)
    src = dist.get_global_rank(group, first) if group is not None else first
    dist.broadcast(buf, src=src, group=group)
    text = bytes(buf.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace")
    return f"rank {src}: {text}"


# --- start-up agreement on config, code and versions --------------------------------------------------

_SOURCE_PACKAGES = ("dtrain", "parallel", "launch")


def flatten_config(node: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}"""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def source_digests(root: str | None = None) -> dict[str, str]:
    """sha256 (shortened) of every .py file of the packages a rank runs, by path relative to `root`."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for package in _SOURCE_PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, "rb") as f:
                        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def fingerprint(cfg) -> dict:
    """What every rank must agree on: the resolved config, the source files, the versions."""
    from dtrain.config import to_dict

    return {
        "config": flatten_config(to_dict(cfg)),
        "code": source_digests(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def _all_gather_bytes(data: bytes, group=None) -> list[bytes]:
    world, device = dist.get_world_size(group), _device(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    buf = _to_tensor(data, max(int(s) for s in sizes), device)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [bytes(b[: int(s)].cpu().tolist()) for b, s in zip(bufs, sizes, strict=True)]


def _first_key_differing(a: dict, b: dict) -> str | None:
    return next((k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)), None)


def _difference(mine: dict, theirs: dict) -> str | None:
    """The first difference between rank 0's fingerprint (`mine`) and another's, as a phrase."""
    a, b = mine["versions"], theirs["versions"]
    if (key := _first_key_differing(a, b)) is not None:
        return f"runs {key} {b.get(key)} where rank 0 runs {key} {a.get(key)}; use one environment everywhere"
    a, b = mine["code"], theirs["code"]
    if (path := _first_key_differing(a, b)) is not None:
        what = "lacks" if path not in b else "has an extra" if path not in a else "has another"
        return (
            f"{what} {path} (its dtrain source differs from rank 0's); install the same commit on every node"
        )
    a, b = mine["config"], theirs["config"]
    if (key := _first_key_differing(a, b)) is not None:
        return (
            f"was started with {key}={b.get(key)!r} where rank 0 has {a.get(key)!r}; start every rank "
            f"with the same CONFIG and overrides"
        )
    return None


def check_ranks_agree(cfg, group=None, print_fn=None, *, _fingerprint: dict | None = None) -> None:
    """Collective, at start-up: every rank must run the same config, code and versions. Raises
    ConfigError on every rank, naming the lowest rank that differs from rank 0 and what differs.
    (`_fingerprint` replaces this rank's own, for tests.)"""
    from dtrain.config import ConfigError

    own = _fingerprint if _fingerprint is not None else fingerprint(cfg)
    data = json.dumps(own, sort_keys=True, default=str).encode()
    everyone = _all_gather_bytes(data, group)
    if all(d == everyone[0] for d in everyone):
        return
    prints = [json.loads(d) for d in everyone]  # JSON only: a peer's bytes are never executed
    for rank, theirs in enumerate(prints[1:], start=1):
        if everyone[rank] != everyone[0]:
            others = sum(d != everyone[0] for d in everyone) - 1
            more = f" (and {others} more rank{'s' if others > 1 else ''})" if others else ""
            what = _difference(prints[0], theirs) or "differs from rank 0 in its start-up fingerprint"
            raise ConfigError(f"rank {rank}{more} {what}")


# --- collectives named by the phase they interrupted --------------------------------------------------


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer; the message names the phase, the group and the step."""


_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused", re.IGNORECASE)


class _Phases:
    """The phases a rank is in right now, outermost first: (what it does, which step)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.stack: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def enter(self, what: str, when: str) -> Iterator[None]:
        self.stack.append((what, when))
        try:
            yield
        except RuntimeError as e:
            named = self._explain(e)
            if named is None:
                raise
            raise named from None
        finally:
            self.stack.pop()

    def _explain(self, error: RuntimeError) -> CollectiveError | None:
        # Only errors from torch.distributed itself: Gloo raises plain RuntimeError, torch raises
        # DistError subclasses. Our own RuntimeError subclasses (a checkpoint that could not be written
        # because an NFS mount "timed out") keep their own message.
        if type(error) is not RuntimeError and not isinstance(error, dist.DistError):
            return None
        text = str(error)
        what = self.stack[-1][0]  # the innermost phase knows the operation
        when = next((w for _, w in self.stack if w), "")  # the outermost knows the step
        where = f"{what} {when}".strip()
        if _TIMED_OUT.search(text):
            return CollectiveError(
                f"{where} timed out after {self.timeout_s:g}s: a rank of that group is stalled or has "
                f"died (its own log says which); raise dist.timeout_s if this phase is just slow"
            )
        if _PEER_GONE.search(text):
            return CollectiveError(
                f"a peer closed its connection during {where}: that rank has died (see its log)"
            )
        return None


_LONG_NAMES = {"pp": "pipeline", "tp": "tensor-parallel", "dp": "data-parallel", "dp_cp": "data-parallel",
               "dp_shard": "data-parallel shard", "dp_replicate": "data-parallel replica",
               "ep": "expert-parallel", "cp": "context-parallel", "world": "world"}  # fmt: skip


def group_phrase(grid, names: tuple[str, ...]) -> str:
    """'the data-parallel group (ranks 0, 1)' for those of the groups `names` that have several ranks."""
    parts = []
    for name in names:
        ranks = tuple(range(grid.world_size)) if name == "world" else grid.ranks(name)
        if len(ranks) > 1:
            parts.append(f"the {_LONG_NAMES[name]} group (ranks {', '.join(map(str, ranks))})")
    return " and ".join(parts) or "one-rank groups (no communication)"


class CollectivePhases:
    """What each phase the trainer enters communicates, over which of this rank's groups: `enter(name,
    when)` is the scope the trainer opens around it (dtrain.trainer.Trainer(phases=...)). A collective that
    times out or loses its peer inside is re-raised naming the innermost phase and the outermost step.
    `zero`: the ZeRO stage (stage 3 gathers in forward and backward; every stage gathers its shards for a
    save and all-gathers after the step)."""

    def __init__(self, grid, zero: int, timeout_s: float):
        self._phases = _Phases(timeout_s)
        # ZeRO under hybrid sharding gathers and reduce-scatters within its shard group and sums the
        # gradient shards over the replica group.
        hybrid = zero and grid.size("dp_replicate") > 1
        dp = "dp_shard" if hybrid else "dp_cp"
        replicas = ("dp_replicate",) if hybrid else ()
        over = lambda *names: group_phrase(grid, names)  # noqa: E731
        fb_groups = ("pp", "tp", "cp", dp) if zero == 3 else ("pp", "tp", "cp")
        optimizer = "the optimizer step"
        if zero:
            optimizer += f" (all-gather over {over(dp)})"
        self.what = {
            "forward_backward": f"the forward/backward (send/recv, all-reduce over {over(*fb_groups)})",
            "grad_sync": f"the gradient reduction over {over(dp, *replicas, 'tp')}",
            "grad_norm": f"the gradient-norm all-reduce over {over('tp', 'pp', 'ep', dp)}",
            "optimizer_step": optimizer,
            "loss": f"the loss all-reduce over {over('pp', 'dp', 'cp')}",
            "metrics": f"the peak-memory all-gather over {over('world')}",
            "evaluation": f"the evaluation forward (send/recv, all-reduce over {over('pp', 'tp')})",
            "save": f"the checkpoint save (gathers over {over('tp', dp) if zero else over('tp')}, barriers "
            "over the world)",
            "load": "the checkpoint load (gathers over the world)",
            "sample": f"the weights gathered for a sample (over {over('tp', dp) if zero else over('tp')}, "
            f"then {over('pp')})",
        }  # fmt: skip

    def enter(self, name: str, when: str = ""):
        return self._phases.enter(self.what[name], when)


@contextlib.contextmanager
def startup_phase(timeout_s: float) -> Iterator[None]:
    """Names a collective failure in the start-up agreement check like the trainer's phases."""
    what = "the start-up check that all ranks run the same config and code (all-gather over the world)"
    with _Phases(timeout_s).enter(what, ""):
        yield

"""Runs `dtrain train` under torchrun, with the process count taken from the config.

The config is loaded and validated here, before any process starts, so a bad one costs one line. Options
(before or after CONFIG) are torchrun's and pass through verbatim, ahead of the program;
`--nproc-per-node` defaults to the config's world size divided by `--nnodes`, and a single node without
rendezvous options runs `--standalone`. Every process then runs `python -m dtrain train CONFIG
[key=value ...]` (see launch/slurm.sbatch for clusters). When a worker fails with a dtrain error, the
launcher ends with that one line (in place of torchrun's failure report) and its exit status.
"""

from __future__ import annotations

import os
import sys
import tempfile

from dtrain.config import ConfigError, load_config
from dtrain.validation import validate

ERROR_FILE = "TORCHELASTIC_ERROR_FILE"  # where a torchrun process or worker records its error (JSON)
USAGE = "usage: python -m launch [torchrun options] CONFIG [key=value ...] [torchrun options]"
# torchrun options that take no value; every other option takes one (`--opt value` or `--opt=value`).
FLAGS = {"--standalone", "--virtual-local-rank"}
# Set by the launcher itself: the program is always `-m dtrain train ...`.
RESERVED = {"-m", "--module", "--no-python", "--run-path"}
# Any of these means the user arranges the rendezvous (or several nodes), so no `--standalone`.
RENDEZVOUS = {"--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--rdzv-conf", "--master-addr",
              "--master-port", "--node-rank", "--standalone"}  # fmt: skip


def _split(argv: list[str]) -> tuple[list[str], dict[str, str | None], str, list[str]]:
    """Torchrun options (verbatim, and by canonical name) apart from CONFIG and the overrides. Options may
    come before or after CONFIG (an override never starts with '-'); they are handed to torchrun first."""
    opts: list[str] = []
    seen: dict[str, str | None] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            rest.append(token)
            i += 1
            continue
        name, eq, value = token.partition("=")
        if token.startswith("--"):
            name = name.replace("_", "-")
        elif len(token) > 2:  # a short option with its value attached, as in -r3
            name, eq, value = token[:2], "=", token[2:]
        if name in RESERVED:
            raise ConfigError(f"{name} is set by the launcher (it always runs `-m dtrain train CONFIG`)")
        step = 1 if eq or name in FLAGS else 2  # `--opt value` takes the next token along
        if i + step > len(argv):
            raise ConfigError(f"torchrun option {name} needs a value")
        opts += argv[i : i + step]
        seen[name] = None if name in FLAGS else argv[i + 1] if step == 2 else value
        i += step
    if not rest:
        raise ConfigError(f"no CONFIG given; {USAGE}")
    return opts, seen, rest[0], rest[1:]


def _nnodes(seen: dict[str, str | None]) -> int:
    raw = seen.get("--nnodes") or "1"
    lo, _, hi = raw.partition(":")
    try:
        n_min, n_max = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"--nnodes={raw} is not a node count") from None
    if n_min != n_max or n_min < 1:
        raise ConfigError(
            f"--nnodes={raw}: the launcher needs one fixed node count (elastic ranges: use torchrun)"
        )
    return n_min


def build_torchrun_argv(argv: list[str]) -> list[str]:
    """The arguments for `torch.distributed.run.main` that run `dtrain train` as `argv` asks.

    Loads and validates the config (raising ConfigError with a one-line message) but starts nothing.
    """
    opts, seen, config, overrides = _split(argv)
    nnodes = _nnodes(seen)
    nproc_raw = seen.get("--nproc-per-node")
    if nproc_raw is not None and (not nproc_raw.isdigit() or int(nproc_raw) < 1):
        raise ConfigError(f"--nproc-per-node={nproc_raw} must be a positive number (or leave it out)")
    cfg = load_config(config, overrides)
    p = cfg.parallel
    if nproc_raw is not None:
        world = int(nproc_raw) * nnodes
    elif p.dp == -1 and cfg.dist.nproc_per_node:
        world = cfg.dist.nproc_per_node * nnodes
    elif p.dp == -1:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise ConfigError(
                "parallel.dp=-1 counts the GPUs, but CUDA is not available; "
                "set dist.nproc_per_node=N, parallel.dp=N or pass --nproc-per-node N"
            )
        world = torch.cuda.device_count() * nnodes
    else:
        world = p.dp * p.tp * p.pp * p.cp
    validate(cfg, world)
    extra = []
    if nproc_raw is None:
        if world % nnodes:
            raise ConfigError(f"world size {world} from the config is not divisible by --nnodes={nnodes}")
        extra += ["--nproc-per-node", str(world // nnodes)]
    if nnodes == 1 and not RENDEZVOUS & seen.keys():
        extra.append("--standalone")
    _check_restartable(seen, nnodes, standalone="--standalone" in extra)
    return [*opts, *extra, "--module", "dtrain", "train", config, *overrides]


def _check_restartable(seen: dict[str, str | None], nnodes: int, standalone: bool) -> None:
    """Restarts under the static rendezvous cannot work (dtrain.runtime): say so before anything starts.
    torchrun runs the static rendezvous for --rdzv-backend static (its default) unless --standalone, or
    one node with neither --rdzv-endpoint nor --master-port (which it turns into --standalone)."""
    raw = seen.get("--max-restarts") or "0"
    if not raw.isdigit():
        raise ConfigError(f"--max-restarts={raw} is not a number of restarts")
    static = (
        not standalone
        and "--standalone" not in seen
        and (seen.get("--rdzv-backend") or "static") == "static"
        and ("--rdzv-endpoint" in seen or "--master-port" in seen or nnodes > 1)
    )
    if int(raw) > 0 and static:
        from dtrain.runtime import static_restart_error

        raise ConfigError(static_restart_error(int(raw)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"{USAGE}\n\n{__doc__.strip()}\n\ntorchrun options: python -m torch.distributed.run --help")
        sys.exit(0)
    try:
        torchrun_argv = build_torchrun_argv(argv)
    except ConfigError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("launch: torchrun " + " ".join(torchrun_argv), file=sys.stderr, flush=True)
    # Restarts (--max-restarts) need a fresh rendezvous store per attempt: see dtrain.runtime.
    from dtrain.runtime import NO_SHARED_STORE

    os.environ.setdefault(NO_SHARED_STORE, "1")

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun's @record copies the failed worker's error file to its own, or logs an error that it has
    # none: give it one (a scheduler's own TORCHELASTIC_ERROR_FILE is kept).
    own_error_file = None
    if not os.environ.get(ERROR_FILE):
        own_error_file = os.path.join(tempfile.gettempdir(), f"dtrain-launch-{os.getpid()}-error.json")
        os.environ[ERROR_FILE] = own_error_file
    try:
        torchrun(torchrun_argv)
    except ChildFailedError as e:
        line, code = worker_error(e)
        # The workers printed their own errors; end with the first one dtrain reported (its error file),
        # else with torchrun's summary. No launcher traceback either way.
        print(line or e, file=sys.stderr)
        sys.exit(code if 0 < code < 256 else 1)
    finally:
        if own_error_file is not None:
            del os.environ[ERROR_FILE]
            if os.path.exists(own_error_file):
                os.remove(own_error_file)


def worker_error(e) -> tuple[str | None, int]:
    """The earliest `dtrain: error: ...` line a failed worker left in its torchrun error file (written by
    dtrain.cli.exit_error) and that worker's exit code; else (None, exit code of torchrun's first failure)."""
    failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
    for failure in failures:
        message = failure.message.get("message") if isinstance(failure.message, dict) else None
        if isinstance(message, str) and message.startswith("dtrain: error: "):
            return message, failure.exitcode
    return None, e.get_first_failure()[1].exitcode

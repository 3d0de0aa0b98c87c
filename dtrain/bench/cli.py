"""What the benchmark commands share on the command line: the model and data flags, their checks, how they
become a dtrain config, and the exit status (2 for a config dtrain rejects, before any process starts)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_model_args(p: argparse.ArgumentParser, *, n_layers: int, seq_len: int, batch: tuple) -> None:
    """--d-model, --n-layers, --n-heads, --seq-len, the batch flag, --vocab and --seed, in that order.
    The benchmarks differ only in some defaults and in the batch flag: `batch` is (flag, default, help)."""
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=n_layers)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=seq_len)
    flag, default, help_ = batch
    p.add_argument(flag, type=int, default=default, help=help_)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)


def check_world(p: argparse.ArgumentParser, args, ranks: int, flag: str, what: str) -> None:
    """Rejects (argparse's exit 2) a world of fewer than 2 ranks and fewer than 1 timed step."""
    if ranks < 2:
        p.error(f"{flag} {ranks}: {what} needs at least 2 ranks")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")


def model_overrides(args) -> list[str]:
    """dtrain config overrides for the model and data flags of `add_model_args` (the batch aside, which
    each benchmark lays out its own way). Dropout is off so both implementations compute the same loss."""
    return [
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}",
        "model.dropout=0.0",
        f"train.seq_len={args.seq_len}",
        f"train.seed={args.seed}",
    ]


def config_of(args, overrides: list[str], world_size: int):
    """The validated dtrain config: the model flags plus the benchmark's own `overrides`."""
    from dtrain.config import load_config, validate

    return validate(load_config(None, [*model_overrides(args), *overrides]), world_size)


def exit_status(run: Callable, argv=None) -> int:
    """Runs the command; a config dtrain rejects is an error message and exit status 2, not a traceback."""
    from dtrain.config import ConfigError

    try:
        run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""`dtrain` command line: train, prepare-data, export.

Expected failures (bad config, bad data, bad checkpoint, diverged training) print one line,
`dtrain: error: ...`, and exit non-zero without a traceback. Config and data are checked before any
process group is created.
"""

from __future__ import annotations

import argparse
import os
import sys

from dtrain.checkpoint import CheckpointError
from dtrain.config import ConfigError
from dtrain.data import DataError

EXPECTED = (ConfigError, DataError, CheckpointError)


def cmd_train(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from dtrain.config import load_config, validate
    from dtrain.data import build_dataset
    from dtrain.runtime import init_distributed
    from dtrain.trainer import Trainer
    from parallel.grid import ProcessGrid

    cfg = validate(load_config(args.config, args.overrides), int(os.environ.get("WORLD_SIZE", "1")))
    build_dataset(cfg, "train")  # a missing or malformed data file fails here, before any process group
    device = init_distributed(cfg.dist)
    try:
        p = cfg.parallel
        grid = ProcessGrid(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep)
        Trainer(cfg, grid, device).fit()
    finally:
        dist.destroy_process_group()


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from dtrain.data import prepare_text

    info = prepare_text(args.text, args.out, val_fraction=args.val_fraction, dtype=args.dtype)
    print(
        f"wrote {info['train_tokens']:,} training and {info['val_tokens']:,} validation tokens "
        f"(byte-level, vocab {info['vocab_size']}) to {info['out_dir']}; train with "
        f"data.kind=memmap data.path={info['out_dir']}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from dtrain import checkpoint
    from dtrain.config import config_from_dict
    from dtrain.model import Transformer

    checkpoint.verify(args.checkpoint)
    cfg = config_from_dict(checkpoint.load_state(args.checkpoint)["config"])
    model = Transformer(cfg.model)
    tensors = checkpoint.load_parts(args.checkpoint, "model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in tensors or tuple(tensors[name].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{args.checkpoint}: parameter '{name}' is missing or has another shape"
                )
            p.copy_(tensors[name])
    # model.state_dict() lists tied weights under both names, so the file loads with strict=True.
    tmp = args.out + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {n:,} parameters from {args.checkpoint} to {args.out}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dtrain", description="Hand-written distributed LM training.")
    sub = ap.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (under torchrun for several processes)")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.dp=2")
    train.set_defaults(run=cmd_train)
    prep = sub.add_parser("prepare-data", help="turn a text file into byte-level train/val token files")
    prep.add_argument("text", help="a local UTF-8 (or any) text file")
    prep.add_argument("--out", required=True, help="output folder for train.npy and val.npy")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    prep.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    prep.set_defaults(run=cmd_prepare_data)
    export = sub.add_parser("export", help="write one consolidated single-process state dict")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step_200")
    export.add_argument(
        "--out", required=True, help="output .pt file (load with torch.load(weights_only=True))"
    )
    export.set_defaults(run=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except EXPECTED as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails the same way; say it once
            print(f"dtrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from dtrain.trainer import TrainingError

        if not isinstance(e, TrainingError):
            raise
        print(f"dtrain: error: {e}", file=sys.stderr)
        sys.exit(1)

"""`dtrain` command line: train, prepare-data, export, generate, eval, schedule, estimate, bench.

Expected failures (bad config, bad data, bad checkpoint, diverged training) print one line,
`dtrain: error: ...`, and exit non-zero without a traceback. Config and data are checked before any
process group is created.
"""

from __future__ import annotations

import argparse
import os
import sys

from dtrain import cli_tools as tools
from dtrain.checkpoint import CheckpointError
from dtrain.config import ConfigError
from dtrain.data import DataError
from dtrain.tokenizer import TokenizerError

EXPECTED = (ConfigError, DataError, CheckpointError, TokenizerError)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other dtrain error (argparse prints the usage block too)."""

    def error(self, message: str):
        print(f"dtrain: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class _IntermixedParser(_Parser):
    """A subcommand's parser that takes its options and its positionals (CONFIG, key=value overrides) in
    any order, as `parse_intermixed_args` does: `dtrain estimate CONFIG parallel.zero=1 --world 8` and
    `dtrain estimate --world 8 CONFIG parallel.zero=1` are the same command. argparse calls a
    subparser's parse_known_args; parse_known_intermixed_args calls it back twice (options first, then
    positionals), which the flag sends to the ordinary parsing."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        if extras:  # said here, where the subcommand is known
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def cmd_train(args: argparse.Namespace) -> None:

    import torch.distributed as dist

    from dtrain import resilience, run_folder, runtime
    from dtrain.config import load_config
    from dtrain.data import check_data
    from dtrain.hf import check_init_from
    from dtrain.trainer import Trainer
    from dtrain.validation import validate

    cfg = validate(load_config(args.config, args.overrides), int(os.environ.get("WORLD_SIZE", "1")))
    first = os.environ.get("RANK", "0") == "0"  # every rank checks the same; rank 0 says and moves

    def say(text: str) -> None:
        if first:
            print(text, flush=True)

    # Bad input fails here, in one line, before any process group exists or anything is written:
    check_data(cfg)  # a missing or malformed data file, token ids beyond the vocabulary
    check_init_from(cfg.model)  # a Hugging Face folder whose tensors are not the model's
    if cfg.train.sample_every:
        from dtrain.generate import check_sample_prompt

        check_sample_prompt(cfg)  # a prompt the model cannot encode, or one too long to continue
    run_folder.check_out_dir(cfg)  # a fresh run into the folder of an earlier one
    resume_from = run_folder.check_resume(cfg, warn=say)  # the checkpoint to resume: another model shape
    runtime.check_restartable()  # torchrun restarts that cannot work
    done = run_folder.run_complete(resume_from, cfg.train.steps) if resume_from else None
    if done:
        say(done)
        return
    if cfg.run.overwrite and first:
        aside = run_folder.move_aside(cfg.run.out_dir)
        if aside:
            say(f"dtrain: run.overwrite=true: moved the earlier run's outputs to {aside}")
    device = runtime.init_distributed(cfg.dist)
    try:
        timeout = cfg.dist.timeout_s
        with resilience.startup_phase(timeout):
            resilience.check_ranks_agree(cfg)  # before the grid: ranks that disagree cannot build it
        grid = runtime.process_grid(cfg)
        phases = resilience.CollectivePhases(grid, cfg.parallel.zero, timeout)
        Trainer(cfg, grid, device, phases=phases).fit(resume_from)
    finally:
        dist.destroy_process_group()


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from dtrain.prepare import prepare_data

    info = prepare_data(
        args.text, args.out, args.format, args.tokenizer, val_fraction=args.val_fraction, dtype=args.dtype
    )
    splits = info["splits"]
    val = splits.get("val", {"tokens": 0})
    docs = f" in {splits['train']['documents']:,} documents" if splits["train"]["documents"] else ""
    print(
        f"wrote {splits['train']['tokens']:,} training tokens{docs} and {val['tokens']:,} validation tokens "
        f"({info['format']}, {info['tokenizer']}, vocab {info['vocab_size']}) to {info['out_dir']}; train "
        f"with data.kind=memmap data.path={info['out_dir']} model.vocab_size>={info['vocab_size']}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from dtrain import checkpoint
    from dtrain.config import config_from_dict
    from dtrain.model import Transformer

    checkpoint.verify(args.checkpoint)
    cfg = config_from_dict(checkpoint.load_state(args.checkpoint)["config"])
    model = Transformer(cfg.model)
    tensors = checkpoint.model_tensors(args.checkpoint)  # with the base a LoRA checkpoint names
    if args.format == "peft":
        from dtrain import hf, lora

        dtype = hf.DTYPES[args.dtype or hf.default_dtype(cfg.model)]
        n = lora.export_peft(tensors, cfg.model, args.out, dtype)
        print(f"exported {n} adapter tensors from {args.checkpoint} to {args.out} (PEFT adapter folder)")
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in tensors or tuple(tensors[name].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{args.checkpoint}: parameter '{name}' is missing or has another shape"
                )
            p.copy_(tensors[name])
    if args.format == "hf":
        from dtrain import hf

        dtype = args.dtype or hf.default_dtype(cfg.model)
        canonical = dict(model.named_parameters())  # a tied head is the embedding: listed once
        if cfg.model.lora.rank:  # the adapters merged into the weights they adapt: W + s B A
            from dtrain.lora import merge

            canonical = merge(canonical, cfg.model)
        from dtrain.analysis.suggest import parse_bytes

        max_shard = parse_bytes(args.max_shard_size, "--max-shard-size")
        hf.export_hf(canonical, cfg.model, args.out, dtype, max_shard)
        n = sum(p.numel() for p in canonical.values())
        print(
            f"exported {n:,} parameters ({dtype}) from {args.checkpoint} to {args.out} (Hugging Face folder)"
        )
        return
    # model.state_dict() lists tied weights under both names, so the file loads with strict=True.
    tmp = args.out + ".tmp"
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, args.out)
    except BaseException:  # a full disk: leave neither a torn file nor a stray .tmp behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {n:,} parameters from {args.checkpoint} to {args.out}")


# ----------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dtrain", description="Hand-written distributed LM training.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    train = sub.add_parser("train", help="train (under torchrun for several processes)")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.dp=2")
    train.set_defaults(run=cmd_train)
    prep = sub.add_parser(
        "prepare-data",
        help="tokenise text, jsonl, prompt/response or chat records into train/val token files",
    )
    prep.add_argument("text", help="a local input file: plain text, or JSON lines for the other formats")
    prep.add_argument("--out", required=True, help="output folder for train.npy, val.npy and manifest.json")
    prep.add_argument(
        "--format",
        choices=("text", "jsonl", "prompt-response", "chat"),
        default="text",
        help='text: a plain file; jsonl: {"text": ...} per line; prompt-response: {"prompt": ..., '
        '"response": ...} per line (the response is learned); chat: {"messages": [...]} per line, '
        "rendered with the tokenizer's chat_template (assistant turns are learned)",
    )
    prep.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        help="a Hugging Face model or tokenizer folder (tokenizer.json, tokenizer_config.json); "
        "default: byte-level tokens",
    )
    prep.add_argument(
        "--val-fraction", type=float, default=0.1, help="share held out for validation (0: none)"
    )
    prep.add_argument(
        "--dtype", choices=("uint16", "uint32"), default=None, help="default: uint16 when the ids fit"
    )
    prep.set_defaults(run=cmd_prepare_data)
    export = sub.add_parser(
        "export", help="write a checkpoint as one consolidated state dict, or as a Hugging Face model folder"
    )
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step_200")
    export.add_argument(
        "--out",
        required=True,
        help="output .pt file (load with torch.load(weights_only=True)), or a new folder with --format hf",
    )
    export.add_argument(
        "--format",
        choices=("pt", "hf", "peft"),
        default="pt",
        help="pt: dtrain's consolidated state dict (default); hf: config.json + safetensors that "
        "transformers loads, with the tokenizer files of model.init_from (LoRA adapters merged into the "
        "weights); peft: a LoRA run's adapters as adapter_config.json + adapter_model.safetensors that "
        "peft.PeftModel.from_pretrained loads onto the model.init_from base",
    )
    export.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        help="--format hf or peft: weight dtype (default: the init_from folder's, else fp32)",
    )
    export.add_argument(
        "--max-shard-size",
        default="5GB",
        help="--format hf: largest safetensors file before sharding (default 5GB)",
    )
    export.set_defaults(run=cmd_export)
    tools.add_generate_parsers(sub)
    tools.add_schedule_parser(sub)
    tools.add_estimate_parser(sub)
    tools.add_bench_parser(sub)
    return ap


def exit_error(line: str, code: int, say: bool = True) -> None:
    """Exit with `code` after `line` (one line, `dtrain: error: ...`) on stderr where `say`. Under torchrun
    the line also goes to the error file it gives each worker (TORCHELASTIC_ERROR_FILE, the format of
    torch.distributed.elastic's ErrorHandler), so torchrun's failure report shows it as the root cause
    instead of 'To enable traceback see ...', and `python -m launch` can end with it."""
    if say:
        print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        record = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(record, f)
        except OSError:
            pass  # the report then says less; the line itself is printed already
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        args.run(args)
    except EXPECTED as e:
        exit_error(f"dtrain: error: {e}", 2, say=rank == "0")  # every rank fails the same way; say it once
    except Exception as e:
        from dtrain.resilience import CollectiveError
        from dtrain.trainer import TrainingError

        if isinstance(e, TrainingError):  # decided from values every rank shares: every rank stops
            exit_error(f"dtrain: error: {e}", 1, say=rank == "0")
        elif isinstance(e, CollectiveError | OSError):  # seen by some ranks only: each says what it saw
            who = f"rank {rank}: " if "RANK" in os.environ else ""
            exit_error(f"dtrain: error: {who}{e}", 1)
        raise

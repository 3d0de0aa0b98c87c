"""`dtrain eval MODEL DATA`: loss, perplexity and bits per byte of a model on a prepared data folder.

By default it computes what the trainer logs as val_loss for the same checkpoint and data: the mean token
loss over `train.eval_batches` global batches of the validation split, drawn as the trainer draws them
(windows of `train.seq_len` + 1 tokens in the order of `train.seed`), in the checkpoint's
`train.precision` as training computes it: bf16/fp16 parameters (the saved fp32 masters rounded to
nearest), no autocast. `--batches all` instead reads every token of the split exactly once as a target
(consecutive windows, the last one shorter, padding ignored). It runs in any layout, under torchrun like
training (parallel.* overrides), through the same model chunks and pipeline executor as the trainer's
evaluation.

A folder of documents (prepared with --format jsonl, prompt-response or chat) is read in document rows,
as the trainer reads it: only learned tokens are targets, and `--batches all` reads every piece of the
split once. Bits per byte is loss_nats * tokens / bytes / ln 2. Byte-level data (a model of 256 ids without a
tokenizer) has one byte per token; with a tokenizer the bytes are those of the evaluated target tokens
decoded window by window.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from dtrain.config import Config, ConfigError
from dtrain.data import DataError, MemmapData, build_dataset, global_target_tokens, rank_microbatches
from dtrain.generate import ModelSource

SPLITS = {"val": ("val",), "train": ("train",), "all": ("train", "val")}


def prepare(source: ModelSource, data: str, split: str, world_size: int) -> tuple[Config, dict]:
    """Point the config at DATA and validate it for this world; open every split it reads and check its
    token ids. Before any process group: bad input costs one line."""
    from dtrain.validation import validate

    if not os.path.isdir(data):
        raise DataError(
            f"DATA {data} is not a folder; give one `dtrain prepare-data` wrote (train.npy, val.npy)"
        )
    cfg = source.cfg
    cfg.data.kind, cfg.data.path = "memmap", data
    cfg = validate(cfg, world_size)
    datasets = {}
    for name in SPLITS[split]:
        path = os.path.join(data, f"{name}.npy")
        if not os.path.isfile(path):
            raise DataError(
                f"DATA {data} has no {name}.npy; choose another --split or run `dtrain prepare-data`"
            )
        dataset = build_dataset(cfg, name)  # a folder of documents gives document rows, as in training
        dataset.check_token_ids()
        datasets[name] = dataset
    return cfg, datasets


def whole_split_batches(dataset: MemmapData, global_batch_size: int):
    """Every token after the first as a target exactly once: consecutive windows (the last one shorter,
    padded with ignored targets), in global batches filled up with rows of ignored targets. Yields each
    batch as (global_batch_size, 2, seq_len): inputs and targets; read from the file batch by batch."""
    L, tokens = dataset.seq_len, dataset.tokens
    n = len(tokens) - 1
    starts = range(0, n, L)
    for first in range(0, len(starts), global_batch_size):
        batch = torch.zeros(global_batch_size, 2, L, dtype=torch.long)
        batch[:, 1] = -100
        for row, start in enumerate(starts[first : first + global_batch_size]):
            window = torch.from_numpy(np.asarray(tokens[start : min(start + L, n) + 1]).astype(np.int64))
            batch[row, 0, : len(window) - 1], batch[row, 1, : len(window) - 1] = window[:-1], window[1:]
        yield batch


def _rank_rows(
    batch: torch.Tensor, dp_rank: int, dp: int, micro: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    per_rank = batch.shape[0] // dp
    mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [(mine[i : i + micro, 0], mine[i : i + micro, 1]) for i in range(0, per_rank, micro)]


def sampled_batch(dataset: MemmapData, step: int, global_batch_size: int) -> torch.Tensor:
    """The global batch the trainer's evaluation reads as its batch `step`, as (rows, 2, seq_len)."""
    rows = dataset.batch(step, 0, global_batch_size)
    return torch.stack([rows[:, :-1], rows[:, 1:]], dim=1)


def document_batches(dataset, batches: int | None, global_batch_size: int, dp_rank: int, dp: int, micro: int):
    """Document rows as the trainer reads them: (this rank's micro-batches, the global batch's targets,
    its target count) per global batch. With batches=None, every piece of the split once: the rows of
    the first epoch, the last batch's rows beyond it kept out (targets -100)."""
    rows = dataset.epoch_rows(0) if batches is None else None
    per_rank = global_batch_size // dp
    for step in range(batches if batches is not None else -(-rows // global_batch_size)):
        whole = rank_microbatches(dataset, step, 0, 1, global_batch_size, global_batch_size)[0]
        if rows is None:
            count = global_target_tokens(dataset, step, global_batch_size)
        else:
            kept = min(global_batch_size, rows - step * global_batch_size)
            whole[1][kept:] = -100
            count = dataset.target_tokens(step, 0, kept)
        first = dp_rank * per_rank
        mine = [
            (
                whole[0][i : i + micro],
                whole[1][i : i + micro],
                {k: v[i : i + micro] for k, v in whole[2].items()},
            )
            for i in range(first, first + per_rank, micro)
        ]
        yield mine, whole[1], count


def _target_bytes(decode, targets: torch.Tensor) -> int:
    return sum(len(decode([t for t in row if t >= 0]).encode("utf-8")) for row in targets.tolist())


@torch.no_grad()
def evaluate(source: ModelSource, cfg: Config, datasets: dict, batches: int | None, grid, device) -> dict:
    """The figures on every rank (collective over the world). batches: global batches per split as the
    trainer draws them, or None for every token once."""
    from dtrain.generate import load_checkpoint_weights
    from dtrain.parallelize import build_model_chunks
    from dtrain.stage import Stage
    from parallel.mixed_precision import to_compute_
    from parallel.precision import dtype_policy, wide

    t = cfg.train
    chunks = build_model_chunks(cfg, grid, device)  # a Hugging Face folder's weights are read here
    if source.kind == "checkpoint":
        load_checkpoint_weights(source.path, list(chunks.values()))  # the fp32 master weights
    compute = dtype_policy(t.precision).param_dtype
    if compute is not None:  # as training computes: the masters rounded to 16 bits, no autocast
        to_compute_([p for chunk in chunks.values() for p in chunk.parameters()], compute)
    stage = Stage(cfg, grid, chunks, device)
    stage.train(False)
    # Summed in fp32 (float64 for a float64 model), as the trainer's evaluation sums.
    total = torch.zeros((), dtype=wide(next(stage.parameters()).detach()[:0]).dtype, device=device)
    dp, dp_rank = grid.size("dp"), grid.coords.dp
    tokenizer = source.tokenizer
    count_bytes = tokenizer is not None and not tokenizer.byte_level and grid.rank == 0
    tokens = n_bytes = 0
    for dataset in datasets.values():
        if getattr(dataset, "documents", False):
            global_batches = document_batches(
                dataset, batches, t.global_batch_size, dp_rank, dp, t.micro_batch_size
            )
        elif batches is None:
            global_batches = (
                (_rank_rows(b, dp_rank, dp, t.micro_batch_size), b[:, 1], int((b[:, 1] >= 0).sum()))
                for b in whole_split_batches(dataset, t.global_batch_size)
            )
        else:
            global_batches = (
                (_rank_rows(b, dp_rank, dp, t.micro_batch_size), b[:, 1], b[:, 1].numel())
                for b in (sampled_batch(dataset, k, t.global_batch_size) for k in range(batches))
            )
        for mine, targets, count in global_batches:  # one at a time: a split can be far larger than memory
            tokens += count
            if count_bytes:
                n_bytes += _target_bytes(tokenizer.decode, targets)
            total += stage.executor.run(stage.eval_actions, mine)
    # As the trainer: the token-loss sums live on the last pipeline stage of every data-parallel replica.
    for name in ("pp", "dp"):
        if grid.size(name) > 1:
            dist.all_reduce(total, group=grid.group(name))
    loss = float(total) / tokens
    if tokenizer is not None and tokenizer.byte_level:
        n_bytes = tokens
    bpb = loss * tokens / n_bytes / math.log(2) if n_bytes else None
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": bpb,
        "tokens": tokens,
        "bytes": n_bytes or None,
        "split": "+".join(datasets),
        "batches": "all" if batches is None else batches,
        "seq_len": t.seq_len,
        "precision": t.precision,
        "layout": dict(grid.layout.sizes),
    }


def default_out(model: str) -> str:
    """Beside the model folder, never inside it (a checkpoint folder verifies only the files it lists)."""
    return os.path.normpath(model) + ".eval.json"


def write_json(path: str, values: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def summary(r: dict) -> str:
    bpb = f" | bpb {r['bpb']:.4f}" if r["bpb"] is not None else " | bpb unknown (no byte count)"
    return (
        f"loss {r['loss']:.4f} | ppl {r['ppl']:.3f}{bpb} | {r['tokens']:,} tokens of {r['split']} "
        f"({'every token' if r['batches'] == 'all' else str(r['batches']) + ' global batches'})"
    )


def command(args) -> None:
    """dtrain eval: every check before the process group, then the evaluation; rank 0 prints and writes."""

    from dtrain import runtime
    from dtrain.generate import resolve

    given = args.batches
    if given is not None and given != "all" and not (given.isdigit() and int(given) > 0):
        raise ConfigError(f"--batches {given}: give a positive number of global batches, or all")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    source = resolve(args.model, args.overrides)
    cfg, datasets = prepare(source, args.data, args.split, world)
    batches = None if given == "all" else int(given or cfg.train.eval_batches)
    if cfg.parallel.cp > 1:  # it cuts its own micro-batches, never into context chunks
        cp = cfg.parallel.cp
        raise ConfigError(f"parallel.cp={cp}: dtrain eval reads whole sequences; set parallel.cp=1")
    if batches == 0:
        raise ConfigError("train.eval_batches=0 evaluates nothing; give --batches N or --batches all")
    out = args.out or default_out(args.model)
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder):
        raise ConfigError(f"--out {out}: give a file name in an existing folder, such as eval.json")
    device = runtime.init_distributed(cfg.dist)
    try:
        grid = runtime.process_grid(cfg)
        result = evaluate(source, cfg, datasets, batches, grid, device)
        if grid.rank == 0:
            write_json(out, {"model": args.model, "data": args.data, **result})
            print(f"{summary(result)}; wrote {out}", flush=True)
    finally:
        dist.destroy_process_group()

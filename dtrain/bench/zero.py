"""Our ZeRO stages against torch DDP, ZeroRedundancyOptimizer and FSDP2, measured in the same run.

    python -m dtrain.bench.zero [--dp 2] [--steps 10] [--warmup 2] [--micro-batches 1] [--bucket-mb 25]
        [--d-model 256 --n-layers 4 --n-heads 8 --seq-len 128 --micro-batch 4 --vocab 1024] [--csv out.csv]

A Gloo world of `dp` CPU processes (cpu_count // dp threads each) builds, on every rank, every
implementation from one model config and the canonical initial weights, all training on the same data (the
global batch of each step: dp * micro-batches * micro-batch rows):

  ours     a dtrain Trainer per entry of OURS (parallel.zero 0 = our DataParallel, 1, 2, 3, each but 0 also
           with parallel.offload=optimizer); an entry dtrain.config.validate refuses (stage 3 before it
           existed) is reported "not implemented" with validate's message. A step is Trainer.train_step.
  pytorch  DDP + AdamW, ZeroRedundancyOptimizer(AdamW) under DDP, FSDP2 (dtrain.bench.zero_pytorch), each
           with our recipe: forward with targets / global tokens (* dp against their averaging), backward,
           clipping to train.grad_clip, AdamW at our learning rate, zero grads.

Step 0 of each, right after it is built, is the untimed counting step: its loss (all must agree); the bytes
of parameters, gradients and optimizer states each rank holds (ours: Trainer.held_bytes(); PyTorch: local
tensors, DTensor shards, before zero_grad) against FORMULAS.md per parameter; the growth of peak RSS
(ru_maxrss) while it was built and stepped; its collectives, with ring costs (comm.ring_bytes) against
FORMULAS.md's 2Ψ·4 (stages 0-2) and 3Ψ·4 (stage 3). Ours are recorded where the library calls
torch.distributed (comm.CollectiveRecorder) and must equal the exact count of our padded buckets
(`bucket_traffic`, stages 0-2); every implementation's are also recorded at the dispatcher
(zero_pytorch.DispatchRecorder: DDP's reducer calls c10d from C++), and for ours the two must agree. Then
warm-up and timed steps of all alternate step by step, each after a barrier; a step lasts as long as its
slowest rank.
"""

from __future__ import annotations

import argparse
import functools
import math
import resource
import sys
from fractions import Fraction

import torch
import torch.distributed as dist

from dtrain.bench.cli import add_model_args, check_world, config_of, exit_status
from dtrain.bench.comm import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, CollectiveRecorder, Phase, ring_bytes
from dtrain.bench.report import publish
from dtrain.bench.timing import after_barrier, alternate, slowest
from dtrain.bench.world import gather, say, spawn
from dtrain.bench.zero_pytorch import PYTORCH, DispatchRecorder, TorchDataParallel
from dtrain.bench.zero_report import HELD_KEYS, SHORT, csv_rows, format_table, summarise

# Our implementations: name -> (parallel.zero, parallel.offload). Stage 3 runs when validate accepts it.
OURS = {
    "ddp": (0, "none"),
    "zero1": (1, "none"),
    "zero1-offload": (1, "optimizer"),
    "zero2": (2, "none"),
    "zero2-offload": (2, "optimizer"),
    "zero3": (3, "none"),
    "zero3-offload": (3, "optimizer"),
}


def make_config(args, zero: int = 0, offload: str = "none"):
    """One implementation's config: dp ranks of `micro_batches` micro-batches of `micro_batch` rows."""
    return config_of(
        args,
        [
            f"parallel.dp={args.dp}",
            f"parallel.zero={zero}",
            f"parallel.offload={offload}",
            f"parallel.bucket_mb={args.bucket_mb}",
            f"train.global_batch_size={args.dp * args.micro_batches * args.micro_batch}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.steps={1 + args.warmup + args.steps}",
            "train.eval_batches=0",
        ],
        args.dp,
    )


def runnable(args) -> tuple[dict, dict[str, str]]:
    """The configs of our implementations that validate accepts, and the others' ConfigError messages."""
    from dtrain.config import ConfigError

    cfgs, refused = {}, {}
    for name, (zero, offload) in OURS.items():
        try:
            cfgs[name] = make_config(args, zero, offload)
        except ConfigError as e:
            if zero < 3:
                raise
            refused[name] = f"not implemented: {e}"
    return cfgs, refused


def bucket_traffic(trainer, n: int, pad: bool = True) -> Fraction | None:
    """Bytes one rank sends per step in our stage 0-2 gradient and parameter collectives, from the bucket
    plan (parallel.data_parallel.plan_buckets) of the trainer's parameters in backward order: stage 0
    all-reduces each bucket as it is; stages 1 and 2 pad each bucket to a multiple of n elements,
    reduce-scatter it (stage 1 once per step, stage 2 after every micro-batch) and all-gather it back
    after the optimizer step. pad=False: the same without the padding. None for stage 3."""
    from dtrain.config import microbatches_per_rank
    from parallel.data_parallel import plan_buckets

    cfg, params, stage = trainer.cfg, trainer.params, trainer.cfg.parallel.zero
    if stage > 2:
        return None
    numels, itemsize = [p.numel() for p in params][::-1], params[0].element_size()
    scatters = microbatches_per_rank(cfg) if stage == 2 else 1
    total = Fraction(0)
    for members in plan_buckets([k * itemsize for k in numels], int(cfg.parallel.bucket_mb * 2**20)):
        numel = sum(numels[i] for i in members)
        if stage == 0:
            total += ring_bytes(ALL_REDUCE, numel * itemsize, n)
        else:
            padded = (math.ceil(numel / n) * n if pad else numel) * itemsize
            total += scatters * ring_bytes(REDUCE_SCATTER, padded, n) + ring_bytes(ALL_GATHER, padded, n)
    return total


class Ours:
    """dtrain's Trainer; `step(index)` is Trainer.train_step (the trainer counts steps itself)."""

    def __init__(self, cfg, grid):
        from dtrain.trainer import Trainer

        self.trainer = Trainer(cfg, grid, torch.device("cpu"))

    def step(self, index: int) -> float:
        assert self.trainer.step == index, (self.trainer.step, index)
        return self.trainer.train_step().loss

    def held_bytes(self) -> dict:
        return self.trainer.held_bytes()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _ok_everywhere(ok: bool) -> bool:
    """Whether every rank succeeded (a rank that alone skipped on would wait in a collective)."""
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag)
    return float(flag) == 0.0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def timed_step(impl, index: int) -> tuple[float, list[float]]:
    loss, started, ended = after_barrier(impl.step, index)
    return loss, [ended - started]


def count_step(impl, n: int) -> dict:
    """The counting step (step 0): loss, bytes held (every rank's), collectives (rank 0's view; every rank
    issues the same ones): the dispatcher's, and for ours the recorded torch.distributed calls."""
    phase = Phase()
    if not isinstance(impl, Ours):  # PyTorch's: count in the step, before zero_grad; phase the norm, loss
        impl.count_held, impl.phase = True, phase
    with DispatchRecorder(phase) as dispatch, CollectiveRecorder(phase) as recorder:
        loss = impl.step(0)
    held = impl.held_bytes()
    impl.count_held = False  # not in the timed steps
    out = {
        "loss": loss,
        "held": gather([float(held[where][what]) for where, what in HELD_KEYS], n),
        "dispatch_calls": dispatch.calls,
        "dispatch_counts": dispatch.counts,
    }
    if isinstance(impl, Ours):
        out["recorded_calls"] = recorder.calls
        out["bucket_traffic"] = bucket_traffic(impl.trainer, n)
        out["unpadded_traffic"] = bucket_traffic(impl.trainer, n, pad=False)
    return out


def build(name: str, cfgs: dict, grid):
    if name in cfgs:
        return Ours(cfgs[name], grid)
    return TorchDataParallel(cfgs["ddp"], name)  # the PyTorch side takes the plain data-parallel config


def measure(rank: int, args) -> dict:
    """Runs on every rank of an initialised world; returns rank 0's view (step times: slowest rank)."""
    from dtrain.config import d_ff_of
    from dtrain.model import count_params
    from parallel.grid import ProcessGrid

    cfgs, errors = runnable(args)
    grid = ProcessGrid(dp=args.dp)
    impls, counted, rss = {}, {}, {}
    for name in [*cfgs, *PYTORCH]:
        say(rank, f"[bench] building and counting {SHORT[name]} (step 0)")
        before = _peak_rss()
        try:
            impl, ok = build(name, cfgs, grid), True
        except Exception as e:  # reported as not run, never replaced by a number
            impl, ok, errors[name] = None, False, _error(e)
        if _ok_everywhere(ok):
            try:
                counted[name], ok = count_step(impl, args.dp), True
            except Exception as e:
                ok, errors[name] = False, _error(e)
            ok = _ok_everywhere(ok)
        if not ok:
            errors.setdefault(name, "failed on another rank")
            counted.pop(name, None)
            say(rank, f"[bench] {SHORT[name]} not run: {errors[name]}")
            continue
        impls[name] = impl
        rss[name] = gather([float(_peak_rss() - before), float(_peak_rss())], args.dp)
    losses = {name: [c["loss"]] for name, c in counted.items()}
    say(rank, "[bench] first-step losses: " + ", ".join(f"{SHORT[k]} {v[0]:.6f}" for k, v in losses.items()))

    timed = {name: functools.partial(timed_step, impl) for name, impl in impls.items()}
    records = alternate(rank, timed, losses, args.warmup, args.steps, SHORT, first_index=1)
    cfg = cfgs["ddp"]
    return {
        "times": {name: slowest([r[0] for r in rows]) for name, rows in records.items()},
        "losses": losses,
        "counted": counted,
        "rss": rss,
        "errors": errors,
        "n_params": count_params(cfg.model)["total"],
        "d_ff": d_ff_of(cfg.model),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.zero",
        description="dtrain's ZeRO stages against torch DDP, ZeroRedundancyOptimizer and FSDP2, one run",
    )
    p.add_argument("--dp", type=int, default=2, help="data-parallel ranks (processes spawned)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation before")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument(
        "--bucket-mb", type=float, default=25.0, help="our gradient bucket size (parallel.bucket_mb)"
    )
    add_model_args(p, n_layers=4, seq_len=128, batch=("--micro-batch", 4, "rows per micro-batch"))
    p.add_argument("--timeout", type=float, default=300.0, help="Gloo timeout (s)")
    p.add_argument("--csv", default=None, help="also write one summary row per implementation to this file")
    args = p.parse_args(argv)
    check_world(p, args, args.dp, "--dp", "data parallelism")
    if args.micro_batches < 1:
        p.error("--micro-batches must be at least 1")
    return args


def run(argv=None) -> dict:
    """Spawn the dp ranks, measure every implementation, print the table (rank 0's results) and return the
    summary."""
    args = parse_args(argv)
    runnable(args)  # a bad config fails here, before any process starts
    raw = spawn(measure, args, args.dp, args.timeout)
    return publish(summarise(args, raw), format_table, csv_rows, args.csv)


def main(argv=None) -> int:
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())

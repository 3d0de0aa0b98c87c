"""Our tensor (and sequence) parallelism against PyTorch's own, measured in the same run.

    python -m dtrain.bench.tensor_parallel [--tp 2] [--sp] [--steps 20] [--warmup 3]
        [--d-model 256 --n-layers 4 --n-heads 8 --seq-len 256 --batch 8 --vocab 1024] [--csv out.csv]

The command spawns a Gloo world of `tp` CPU processes (cpu_count // tp threads each) and builds, on every
rank, two models from one config and the same canonical initial weights (dtrain.model.init_weights):

  ours     the dtrain model built for tensor parallelism (dtrain.trainer.build_model on a ProcessGrid of
           tp ranks): column/row-parallel layers, vocabulary-parallel embedding, head and cross-entropy.
  pytorch  the dense dtrain.model.Transformer parallelised with torch.distributed.tensor.parallel:
           ColwiseParallel for wq/wk/wv and w1/w3, RowwiseParallel for wo and w2, RowwiseParallel on the
           embedding, ColwiseParallel on the head with loss_parallel, and with --sp SequenceParallel on
           the norms: torchtitan's Llama plan (`pytorch_plan`).

Both train on the same batch (random token ids from a fixed seed) with the same AdamW. A step is forward
with targets (token-loss sum) / tokens, backward, the sum of partial gradients over the tensor group
(ours; DTensor does its own), optimizer step, zero grads. The two implementations alternate step by step,
each step timed with time.perf_counter after a barrier; a step lasts as long as its slowest rank.

Before the timed steps each implementation runs one counting step. For ours every call of the
torch.distributed collectives the library uses is recorded (op, tensor bytes, group size) and converted
to bytes sent per rank with ring costs (FORMULAS.md): all-reduce 2(n-1)/n*S, all-gather and
reduce-scatter (n-1)/n*S, S the full (gathered) size. That is compared with the analytic count for this
model (`analytic_bytes`); bytes are deterministic, so the two must be equal. PyTorch's collectives
(DTensor's functional collectives) are counted in its counting step at the dispatcher, as
torch.distributed.tensor.debug.CommDebugMode does, and converted the same way.
"""

from __future__ import annotations

import argparse
import csv
import functools
import inspect
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
)
FORWARD, BACKWARD, AFTER = "forward", "backward", "grad sync + optimizer"
PHASES = (FORWARD, BACKWARD, AFTER)
LABELS = {"ours": "dtrain (ours)", "pytorch": "PyTorch DTensor"}


def threads_per_rank(tp: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp)


# --------------------------------------------------------------------------------------------------------
# Bytes: ring costs and the analytic count
# --------------------------------------------------------------------------------------------------------


def ring_bytes(kind: str, full_bytes: int, n: int) -> Fraction:
    """Bytes one rank sends for a collective over n ranks on a tensor of `full_bytes` (the full, gathered
    size): all-reduce 2(n-1)/n * S; all-gather, reduce-scatter and all-to-all (n-1)/n * S."""
    if n <= 1:
        return Fraction(0)
    if kind == ALL_REDUCE:
        return Fraction(2 * (n - 1), n) * full_bytes
    if kind in (ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL):
        return Fraction(n - 1, n) * full_bytes
    raise ValueError(f"no ring cost for {kind!r}")


@dataclass
class Analytic:
    """Bytes sent per rank per step by our model, from the shapes alone."""

    formulas: Fraction  # FORMULAS.md's per-layer figure (4 all-reduces of b*s*h) times layers
    terms: list[tuple[str, Fraction]]  # every collective our model issues in a step, grouped

    @property
    def total(self) -> Fraction:
        return sum((v for _, v in self.terms), Fraction(0))


def analytic_bytes(cfg, batch: int, seq_len: int) -> Analytic:
    """What our tensor-parallel model sends per rank in one training step, in the default dtype.

    Without SP: per layer the attention and the MLP each leave through an all-reduce (forward) and are
    entered through copy_to_tp, whose backward all-reduces: 4 all-reduces of b*s*h per layer. Besides, the
    vocabulary-parallel embedding's output is all-reduced in forward, the head's region entry all-reduces
    in backward, and the vocabulary-parallel cross-entropy all-reduces three b*s vectors (max, sum of
    exponentials, target logit) in forward. With SP each all-reduce of b*s*h becomes an all-gather plus a
    reduce-scatter (same volume), and the norm gains' partial gradients (2 per layer + the final norm, h
    each) are summed by one all-reduce, which also carries the partial gradients of k/v weights
    replicated over the tensor group (fewer k/v heads than tp; none with the benchmark's config).
    """
    m, n, sp = cfg.model, cfg.parallel.tp, cfg.parallel.sp
    itemsize = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    act = batch * seq_len * m.d_model * itemsize  # one (b, s, h) activation or its gradient
    L = m.n_layers
    ar = ring_bytes(ALL_REDUCE, act, n)
    terms: list[tuple[str, Fraction]] = []
    if sp:
        pair = ring_bytes(ALL_GATHER, act, n) + ring_bytes(REDUCE_SCATTER, act, n)
        terms += [
            ("blocks: 2 all-gathers + 2 reduce-scatters of b*s*h fwd, same bwd, per layer", L * 4 * pair),
            ("embedding: reduce-scatter of b*s*h fwd, all-gather bwd", pair),
            ("head input: all-gather of b*s*h fwd, reduce-scatter bwd", pair),
        ]
    else:
        terms += [
            ("blocks: 2 all-reduces of b*s*h fwd + 2 bwd, per layer", L * 4 * ar),
            ("embedding: all-reduce of b*s*h fwd", ar),
            ("head input (copy_to_tp): all-reduce of b*s*h bwd", ar),
        ]
    ce_bytes = batch * seq_len * max(itemsize, 4)  # the loss widens the logits to at least fp32
    terms.append(
        ("vocab-parallel cross-entropy: 3 all-reduces of b*s fwd", 3 * ring_bytes(ALL_REDUCE, ce_bytes, n))
    )
    partial = (2 * L + 1) * m.d_model if sp else 0  # norm gains
    kv = m.n_kv_heads or m.n_heads
    if kv < n:
        partial += L * 2 * kv * (m.d_model // m.n_heads) * m.d_model  # replicated wk, wv
    if partial:
        label = "sum_partial_grads: 1 all-reduce of the partial grads ((2L+1)*h norm gains)"
        terms.append((label, ring_bytes(ALL_REDUCE, partial * itemsize, n)))
    return Analytic(formulas=L * 4 * ar, terms=terms)


# --------------------------------------------------------------------------------------------------------
# Counting collectives
# --------------------------------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    full_bytes: int
    group_size: int
    phase: str

    @property
    def sent(self) -> Fraction:
        return ring_bytes(self.kind, self.full_bytes, self.group_size)


class Phase:
    """Which part of the step is running; steps set it, recorders stamp it on every call."""

    name = FORWARD


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# torch.distributed.<name> -> (kind, the full size S in bytes from the bound arguments)
_WRAPPED = {
    "all_reduce": (ALL_REDUCE, lambda a: _nbytes(a["tensor"])),
    "all_gather_single": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "reduce_scatter_single": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
    "all_gather": (ALL_GATHER, lambda a: sum(_nbytes(t) for t in a["tensor_list"])),
    "all_gather_into_tensor": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "reduce_scatter_tensor": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
}


@dataclass
class CollectiveRecorder:
    """Records every call of the torch.distributed collectives in `_WRAPPED` while active. The library
    calls them through the module attribute (`dist.all_reduce(...)`), so patching the attribute, in this
    process only, sees them all; the originals are restored on exit."""

    phase: Phase
    calls: list[Call] = field(default_factory=list)

    def __enter__(self) -> CollectiveRecorder:
        self._saved = {name: getattr(dist, name) for name in _WRAPPED}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, fn):
        kind, size_of = _WRAPPED[name]
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            n = dist.get_world_size(bound.arguments.get("group"))
            self.calls.append(Call(kind, size_of(bound.arguments), n, self.phase.name))
            return fn(*args, **kwargs)

        return wrapper


_FUNCOL_KINDS = {
    "all_reduce": ALL_REDUCE,
    "all_reduce_": ALL_REDUCE,
    "all_reduce_coalesced": ALL_REDUCE,
    "all_reduce_coalesced_": ALL_REDUCE,
    "all_gather_into_tensor": ALL_GATHER,
    "all_gather_into_tensor_coalesced": ALL_GATHER,
    "reduce_scatter_tensor": REDUCE_SCATTER,
    "reduce_scatter_tensor_coalesced": REDUCE_SCATTER,
    "all_to_all_single": ALL_TO_ALL,
}

# What torch.distributed.<collective> dispatches to (the set CommDebugMode counts).
_C10D_COLLECTIVES = {
    "_allgather_base_",
    "_reduce_scatter_base_",
    "allgather_",
    "allgather_coalesced_",
    "allgather_into_tensor_coalesced_",
    "allreduce_",
    "allreduce_coalesced_",
    "alltoall_",
    "alltoall_base_",
    "broadcast_",
    "gather_",
    "scatter_",
    "reduce_",
    "reduce_scatter_",
    "reduce_scatter_tensor_coalesced_",
}


def _funcol_call(func, args, kwargs, phase: str) -> Call | None:
    """A functional collective (what DTensor issues) as a Call, or None for any other op."""
    if getattr(func, "namespace", None) != "_c10d_functional":
        return None
    kind = _FUNCOL_KINDS.get(func._overloadpacket.__name__)
    if kind is None:
        return None
    bound = {a.name: v for a, v in zip(func._schema.arguments, args, strict=False)} | dict(kwargs or {})
    tensors = bound["inputs"] if "inputs" in bound else [bound["input"]]
    nbytes = sum(_nbytes(t) for t in tensors)
    if "group_size" in bound:
        n = int(bound["group_size"])
    else:
        from torch.distributed.distributed_c10d import _resolve_process_group

        n = _resolve_process_group(bound["group_name"]).size()
    if kind == ALL_GATHER:
        nbytes *= n  # the input is one shard; S is the gathered size
    return Call(kind, nbytes, n, phase)


class CollectiveCounter:
    """Counts the collectives that reach the dispatcher, per op, and records the bytes of DTensor's
    functional collectives, the way torch.distributed.tensor.debug.CommDebugMode does: DTensor ops are
    let through first, so they desugar into the collectives counted here. CommDebugMode itself breaks on
    this model: its module tracker registers a forward hook per call, and each Block calls its dropout
    module twice in one forward."""

    def __init__(self, phase: Phase):
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts: dict[str, int] = {}
        self.calls: list[Call] = []
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(t is DTensor for t in types):
                    return NotImplemented
                out = func(*args, **(kwargs or {}))
                namespace = getattr(func, "namespace", None)
                name = func._overloadpacket.__name__ if namespace else ""
                call = _funcol_call(func, args, kwargs, phase.name)
                if call is not None or (namespace == "c10d" and name in _C10D_COLLECTIVES):
                    key = f"{namespace}.{name}"
                    counter.counts[key] = counter.counts.get(key, 0) + 1
                if call is not None:
                    counter.calls.append(call)
                return out

        self._mode = _Mode()

    def __enter__(self) -> CollectiveCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


# --------------------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------------------


def make_config(args, world_size: int):
    from dtrain.config import load_config, validate

    overrides = [
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}",
        "model.dropout=0.0",
        f"parallel.tp={args.tp}",
        f"parallel.sp={str(args.sp).lower()}",
        f"train.seq_len={args.seq_len}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        f"train.seed={args.seed}",
    ]
    return validate(load_config(None, overrides), world_size)


_IDLE = Phase()


def build_ours(cfg):
    """Returns the step function of our model; it returns the loss (token mean) as a float."""
    from dtrain.trainer import build_model, build_optimizer
    from parallel.grid import ProcessGrid
    from parallel.sharding import sum_partial_grads

    grid = ProcessGrid(tp=cfg.parallel.tp, dp=1)
    model = build_model(cfg, grid, torch.device("cpu"))
    model.train()
    opt = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs: torch.Tensor, targets: torch.Tensor, phase: Phase = _IDLE) -> float:
        phase.name = FORWARD
        loss = model(inputs, targets) / targets.numel()
        phase.name = BACKWARD
        loss.backward()
        phase.name = AFTER
        sum_partial_grads(params, grid.tp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def pytorch_plan(cfg, sp: bool) -> dict:
    """torchtitan's Llama tensor-parallel plan, spelled for dtrain.model.Transformer's module names.

    Each attention and MLP takes its input as one replicated DTensor (PrepareModuleInput with
    use_local_output=False, as torchtitan does), so the partial input gradients of wq, wk, wv (or w1, w3)
    are added as DTensors and reduced once per region in backward, as ours are; with plain tensor inputs
    every ColwiseParallel layer would all-reduce its own input gradient (5 backward all-reduces per layer
    instead of 2). The head's logits stay sharded on the vocabulary for loss_parallel.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    outside = Shard(1) if sp else Replicate()  # the residual stream's layout between regions
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=outside),
        "head": ColwiseParallel(input_layouts=outside, output_layouts=Shard(-1), use_local_output=False),
    }
    if sp:
        plan["norm"] = SequenceParallel()
    for i in range(cfg.model.n_layers):
        b = f"blocks.{i}"
        plan |= {
            f"{b}.attn": PrepareModuleInput(
                input_layouts=(outside, None, None),  # (x, rotary cos, rotary sin)
                desired_input_layouts=(Replicate(), None, None),
                use_local_output=False,
            ),
            f"{b}.attn.wq": ColwiseParallel(),
            f"{b}.attn.wk": ColwiseParallel(),
            f"{b}.attn.wv": ColwiseParallel(),
            f"{b}.attn.wo": RowwiseParallel(output_layouts=outside),
            f"{b}.mlp": PrepareModuleInput(
                input_layouts=(outside,), desired_input_layouts=(Replicate(),), use_local_output=False
            ),
            f"{b}.mlp.w1": ColwiseParallel(),
            f"{b}.mlp.w3": ColwiseParallel(),
            f"{b}.mlp.w2": RowwiseParallel(output_layouts=outside),
        }
        if sp:
            plan[f"{b}.attn_norm"] = SequenceParallel()
            plan[f"{b}.mlp_norm"] = SequenceParallel()
    return plan


def build_pytorch(cfg):
    """The dense model parallelised by torch.distributed.tensor.parallel; returns its step function."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from dtrain.model import Transformer, init_weights
    from dtrain.trainer import build_optimizer

    tp = cfg.parallel.tp
    model = Transformer(cfg.model)
    init_weights(model, cfg.train.seed)  # the same canonical weights as ours
    for block in model.blocks.values():
        # The attention reshapes with its own head counts, and its local shards hold 1/tp of the heads.
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp
    parallelize_module(model, init_device_mesh("cpu", (tp,)), pytorch_plan(cfg, cfg.parallel.sp))
    model.train()
    opt = build_optimizer(model, cfg.train)

    def step(inputs: torch.Tensor, targets: torch.Tensor, phase: Phase = _IDLE) -> float:
        with loss_parallel():
            phase.name = FORWARD
            loss = model(inputs, targets) / targets.numel()
            phase.name = BACKWARD
            loss.backward()
        phase.name = AFTER
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        return float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)

    return step


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def batch_of(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def measure(rank: int, args) -> dict:
    """Runs on every rank of an initialised world; returns this rank's view (step times are the max over
    ranks)."""
    from dtrain.config import d_ff_of

    cfg = make_config(args, args.tp)
    inputs, targets = batch_of(args)
    _say(rank, f"[bench] building both models (tp={args.tp}, sp={args.sp})")
    steps = {"ours": build_ours(cfg)}
    pytorch_error = None
    try:
        steps["pytorch"] = build_pytorch(cfg)
    except Exception as e:  # reported as not measured, never replaced by a number
        pytorch_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        _say(rank, f"[bench] PyTorch tensor parallelism could not be built: {pytorch_error}")

    losses: dict[str, list[float]] = {name: [] for name in steps}
    comm = {}
    for name, step in steps.items():  # one counting step each, not timed
        phase = Phase()
        with CollectiveCounter(phase) as counter, CollectiveRecorder(phase) as recorder:
            losses[name].append(step(inputs, targets, phase))
        # Disjoint: the recorder sees torch.distributed calls, the counter's bytes are functional ones.
        comm[name] = {"calls": recorder.calls + counter.calls, "counts": dict(counter.counts)}
    _say(
        rank, "[bench] counting step: " + ", ".join(f"{LABELS[k]} loss {v[0]:.4f}" for k, v in losses.items())
    )

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():  # alternate, so drift and noise hit both alike
            dist.barrier()
            started = time.perf_counter()
            losses[name].append(step(inputs, targets))
            elapsed = time.perf_counter() - started
            if i >= args.warmup:
                times[name].append(elapsed)
        if i < args.warmup:
            _say(rank, f"[bench] warm-up {i + 1}/{args.warmup}")
        else:
            now = "  ".join(f"{LABELS[k]} {1e3 * v[-1]:8.1f} ms" for k, v in times.items())
            _say(rank, f"[bench] step {i - args.warmup + 1}/{args.steps}  {now}  (rank 0)")
    for name, values in times.items():  # a step lasts as long as its slowest rank
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times[name] = t.tolist()
    return {
        "times": times,
        "losses": losses,
        "comm": comm,
        "pytorch_error": pytorch_error,
        "analytic": analytic_bytes(cfg, args.batch, args.seq_len),
        "d_ff": d_ff_of(cfg.model),
    }


def _worker(rank: int, args, port: int, result_path: str) -> None:
    torch.set_num_threads(threads_per_rank(args.tp))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.tp,
        timeout=timedelta(seconds=300),
    )
    try:
        out = measure(rank, args)
        if rank == 0:
            with open(result_path, "wb") as f:  # a file, not a pipe: no size limit while we join
                pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dtrain.bench.tensor_parallel",
        description="dtrain's tensor parallelism against PyTorch's (DTensor), same model and batch, one run",
    )
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (processes spawned)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism too (both implementations)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation before")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--csv", default=None, help="also write one summary row per implementation to this file")
    args = p.parse_args(argv)
    if args.tp < 2:
        p.error(f"--tp {args.tp}: tensor parallelism needs at least 2 ranks")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


def run(argv=None) -> dict:
    """Spawn the world, measure, print the table (rank 0's results) and return the summary."""
    args = parse_args(argv)
    make_config(args, args.tp)  # a bad config fails here, before any process starts
    print(f"[bench] spawning {args.tp} Gloo processes, {threads_per_rank(args.tp)} threads each", flush=True)
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        result_path = os.path.join(tmp, "rank0.pkl")
        mp.start_processes(
            _worker, args=(args, _free_port(), result_path), nprocs=args.tp, join=True, start_method="spawn"
        )
        with open(result_path, "rb") as f:
            raw = pickle.load(f)
    summary = summarise(args, raw)
    print(format_table(summary), flush=True)
    if args.csv:
        write_csv(args.csv, summary)
        print(f"[bench] wrote {args.csv}", flush=True)
    return summary


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def summarise(args, raw: dict) -> dict:
    tokens = args.batch * args.seq_len
    impls = {}
    for name, times in raw["times"].items():
        calls = raw["comm"][name]["calls"]
        by = {}
        for c in calls:
            count, sent = by.get((c.phase, c.kind), (0, Fraction(0)))
            by[(c.phase, c.kind)] = (count + 1, sent + c.sent)
        median = statistics.median(times)
        impls[name] = {
            "median_s": median,
            "mean_s": statistics.fmean(times),
            "tokens_per_s": tokens / median,
            "first_loss": raw["losses"][name][0],
            "last_loss": raw["losses"][name][-1],
            "bytes_sent": sum((c.sent for c in calls), Fraction(0)),
            "by_phase_kind": by,
            "counts": raw["comm"][name]["counts"],
        }
    a: Analytic = raw["analytic"]
    s = {
        "config": vars(args),
        "d_ff": raw["d_ff"],
        "impls": impls,
        "analytic": a,
        "pytorch_error": raw["pytorch_error"],
        "measured_bytes": impls["ours"]["bytes_sent"],
        "analytic_bytes": a.total,
        "formulas_bytes": a.formulas,
    }
    s["bytes_match"] = s["measured_bytes"] == a.total
    if "pytorch" in impls:
        s["ratio"] = impls["ours"]["median_s"] / impls["pytorch"]["median_s"]
        s["ratio_mean"] = impls["ours"]["mean_s"] / impls["pytorch"]["mean_s"]
    return s


def _mib(x) -> str:
    return f"{float(x) / 2**20:.3f} MiB"


def format_table(s: dict) -> str:
    c = s["config"]
    lines = [
        "",
        f"== tensor parallelism: tp={c['tp']} sp={c['sp']} | Gloo on CPU, "
        f"{threads_per_rank(c['tp'])} threads per rank ==",
        f"model d_model={c['d_model']} n_layers={c['n_layers']} n_heads={c['n_heads']} d_ff={s['d_ff']} "
        f"vocab={c['vocab']} | batch={c['batch']} seq_len={c['seq_len']} "
        f"({c['batch'] * c['seq_len']} tokens/step)",
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 counting step, the two alternating; "
        f"step time = slowest rank",
        "",
        f"{'implementation':<18}{'median ms':>10}{'mean ms':>10}{'tokens/s':>10}"
        f"{'loss step 1':>13}{'loss last':>11}",
    ]
    for name, r in s["impls"].items():
        lines.append(
            f"{LABELS[name]:<18}{1e3 * r['median_s']:>10.1f}{1e3 * r['mean_s']:>10.1f}"
            f"{r['tokens_per_s']:>10.0f}{r['first_loss']:>13.5f}{r['last_loss']:>11.5f}"
        )
    if "ratio" in s:
        lines.append(
            f"ratio ours / PyTorch step time: {s['ratio']:.3f} (median), {s['ratio_mean']:.3f} (mean); "
            f"lower is better for us"
        )
    else:
        lines.append(f"PyTorch not measured: {s['pytorch_error']}")
    a: Analytic = s["analytic"]
    w = 80
    lines += ["", "bytes sent per rank per step (ring costs, FORMULAS.md), ours:"]
    lines += [f"  {label:<{w}}{_mib(value):>13}" for label, value in a.terms]
    lines += [
        f"  {'FORMULAS.md per-layer figure x layers (4 all-reduces of b*s*h per layer)':<{w}}"
        f"{_mib(a.formulas):>13}",
        f"  {'analytic total for our model':<{w}}{_mib(a.total):>13}",
        f"  {'measured (torch.distributed calls recorded in the counting step)':<{w}}"
        f"{_mib(s['measured_bytes']):>13}",
        f"  measured / analytic = {float(s['measured_bytes'] / a.total):.6f}; "
        f"measured == analytic: {s['bytes_match']} "
        f"({float(s['measured_bytes']):.0f} B vs {float(a.total):.0f} B); "
        f"analytic / FORMULAS.md = {float(a.total / a.formulas):.4f}",
    ]
    if "pytorch" in s["impls"]:
        p = s["impls"]["pytorch"]["bytes_sent"]
        lines.append(
            f"  {'PyTorch measured (DTensor functional collectives at the dispatcher)':<{w}}{_mib(p):>13}"
        )
    lines += ["", "collectives per step", f"  {'':<18}{'phase':<24}{'op':<16}{'calls':>6}{'sent':>14}"]
    for name, r in s["impls"].items():
        label = LABELS[name]
        rows = sorted(r["by_phase_kind"].items(), key=lambda kv: (PHASES.index(kv[0][0]), kv[0][1]))
        for (phase, kind), (count, sent) in rows:
            lines.append(f"  {label:<18}{phase:<24}{kind:<16}{count:>6}{_mib(sent):>14}")
            label = ""
        counts = ", ".join(f"{op} {n}" for op, n in sorted(r["counts"].items()))
        lines.append(f"  {'':<18}dispatcher ops: {counts}")
    if c["sp"] and "pytorch" in s["impls"]:
        lines.append(
            "  (PyTorch leaves the norm gains' gradients Partial after backward; every AdamW foreach op that "
            "reads one\n   redistributes it, hence its optimizer-step all-reduces)"
        )
    return "\n".join(lines)


def write_csv(path: str, s: dict) -> None:
    c = s["config"]
    keys = ("tp", "sp", "d_model", "n_layers", "n_heads", "seq_len", "batch", "vocab", "steps", "warmup")
    header = [
        *keys,
        "impl",
        "median_s",
        "mean_s",
        "tokens_per_s",
        "ratio_ours_over_pytorch",
        "bytes_sent_per_rank",
        "analytic_bytes_per_rank",
        "formulas_bytes_per_rank",
    ]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for name, r in s["impls"].items():
            out.writerow(
                [
                    *(c[k] for k in keys),
                    name,
                    f"{r['median_s']:.6f}",
                    f"{r['mean_s']:.6f}",
                    f"{r['tokens_per_s']:.1f}",
                    f"{s['ratio']:.4f}" if "ratio" in s else "",
                    f"{float(r['bytes_sent']):.0f}",
                    f"{float(s['analytic_bytes']):.0f}" if name == "ours" else "",
                    f"{float(s['formulas_bytes']):.0f}",
                ]
            )


def main(argv=None) -> int:
    from dtrain.config import ConfigError

    try:
        run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

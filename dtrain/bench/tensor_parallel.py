"""Our tensor (and sequence) parallelism against PyTorch's own, measured in the same run.

    python -m dtrain.bench.tensor_parallel [--tp 2] [--sp] [--steps 20] [--warmup 3]
        [--d-model 256 --n-layers 4 --n-heads 8 --seq-len 256 --batch 8 --vocab 1024] [--csv out.csv]

Every rank builds two models from one config and the canonical initial weights (dtrain.model.init_weights):

  ours     dtrain.trainer.build_model on a ProcessGrid of tp ranks: column/row-parallel layers,
           vocabulary-parallel embedding, head and cross-entropy.
  pytorch  the dense dtrain.model.Transformer parallelised by torch.distributed.tensor.parallel with
           torchtitan's Llama plan (`pytorch_plan`), the head's loss under loss_parallel.

Both train on one batch (random token ids from a fixed seed) every step: forward with targets (token-loss
sum) / tokens, backward, the partial-gradient sum over the tensor group (ours; DTensor does its own), AdamW.
The counting step records every collective at the dispatcher (comm.CommRecorder) with the ring costs of
docs/formulas.md; ours must equal the analytic count for the model (`analytic_bytes`) exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction

import torch

from dtrain.bench import comm, harness, report
from dtrain.config import d_ff_of
from dtrain.model import Transformer, init_weights
from dtrain.trainer import build_model, build_optimizer
from parallel.grid import ProcessGrid
from parallel.sharding import sum_partial_grads

LABELS = {"ours": "dtrain (ours)", "pytorch": "PyTorch DTensor"}


@dataclass
class Analytic:
    """Bytes sent per rank per step by our model, from the shapes alone."""

    formulas: Fraction  # docs/formulas.md's per-layer figure (4 all-reduces of b*s*h) times layers
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
    ar = comm.ring_bytes(comm.ALL_REDUCE, act, n)
    if sp:
        pair = comm.ring_bytes(comm.ALL_GATHER, act, n) + comm.ring_bytes(comm.REDUCE_SCATTER, act, n)
        terms = [
            ("blocks: 2 all-gathers + 2 reduce-scatters of b*s*h fwd, same bwd, per layer", L * 4 * pair),
            ("embedding: reduce-scatter of b*s*h fwd, all-gather bwd", pair),
            ("head input: all-gather of b*s*h fwd, reduce-scatter bwd", pair),
        ]
    else:
        terms = [
            ("blocks: 2 all-reduces of b*s*h fwd + 2 bwd, per layer", L * 4 * ar),
            ("embedding: all-reduce of b*s*h fwd", ar),
            ("head input (copy_to_tp): all-reduce of b*s*h bwd", ar),
        ]
    ce_bytes = batch * seq_len * max(itemsize, 4)  # the loss widens the logits to at least fp32
    terms.append(
        (
            "vocab-parallel cross-entropy: 3 all-reduces of b*s fwd",
            3 * comm.ring_bytes(comm.ALL_REDUCE, ce_bytes, n),
        )
    )
    partial = (2 * L + 1) * m.d_model if sp else 0  # norm gains
    kv = m.n_kv_heads or m.n_heads
    if kv < n:
        partial += L * 2 * kv * (m.d_model // m.n_heads) * m.d_model  # replicated wk, wv
    if partial:
        label = "sum_partial_grads: 1 all-reduce of the partial grads ((2L+1)*h norm gains)"
        terms.append((label, comm.ring_bytes(comm.ALL_REDUCE, partial * itemsize, n)))
    return Analytic(formulas=L * 4 * ar, terms=terms)


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


class SameBatch(harness.Implementation):
    """A model and its AdamW trained on one batch every step. `loss_context` wraps forward and backward
    (PyTorch: loss_parallel); `sync_grads` runs after backward (ours: the partial-gradient sum)."""

    def __init__(self, model, cfg, batch, loss_context=contextlib.nullcontext, sync_grads=lambda: None):
        super().__init__()
        self.model, self.batch = model.train(), batch
        self.loss_context, self.sync_grads = loss_context, sync_grads
        self.optimizer = build_optimizer(model, cfg.train)

    def step(self, index: int) -> float:
        inputs, targets = self.batch
        with self.loss_context():
            self.phase.name = comm.FORWARD
            loss = self.model(inputs, targets) / targets.numel()
            self.phase.name = comm.BACKWARD
            loss.backward()
        self.phase.name = comm.AFTER
        self.sync_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        return float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)


def build_ours(cfg, batch) -> SameBatch:
    grid = ProcessGrid(tp=cfg.parallel.tp, dp=1)
    model = build_model(cfg, grid, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    return SameBatch(model, cfg, batch, sync_grads=lambda: sum_partial_grads(params, grid.tp_group))


def pytorch_model(cfg, tp_mesh=None) -> torch.nn.Module:
    """The dense model parallelised by torch.distributed.tensor.parallel over `tp_mesh` (default: the
    world as one tp axis)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    tp = cfg.parallel.tp
    model = Transformer(cfg.model)
    init_weights(model, cfg.train.seed)  # the same canonical weights as ours
    for block in model.blocks.values():
        # The attention reshapes with its own head counts, and its local shards hold 1/tp of the heads.
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp
    tp_mesh = tp_mesh or init_device_mesh("cpu", (tp,))
    return parallelize_module(model, tp_mesh, pytorch_plan(cfg, cfg.parallel.sp))


def build_pytorch(cfg, batch) -> SameBatch:
    from torch.distributed.tensor.parallel import loss_parallel

    return SameBatch(pytorch_model(cfg), cfg, batch, loss_context=loss_parallel)


class TorchTensorParallel(harness.TorchSide):
    """PyTorch's tensor parallelism trained by our recipe (harness.TorchSide): every tp rank takes the same
    micro-batches; the loss under loss_parallel; clip_grad_norm_ over the DTensor gradients."""

    def __init__(self, cfg, grid):
        super().__init__(cfg, loss_group=grid.dp_group)  # the tp ranks hold one loss: no sum over them
        self.model = pytorch_model(cfg).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.train)

    def forward_backward(self, microbatches: list) -> torch.Tensor:
        from torch.distributed.tensor.parallel import loss_parallel

        local = torch.zeros(())
        for x, y in microbatches:
            with loss_parallel():
                loss_sum = self.model(x, y)
                (loss_sum / self.global_tokens).backward()
            local += loss_sum.detach().full_tensor()
        return local / self.global_tokens

    def clip(self) -> None:
        if self.cfg.train.grad_clip:
            clip_grads_by_mesh(self.params, self.cfg.train.grad_clip)


def clip_grads_by_mesh(params: list, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over gradients on different meshes (the plan's DTensor weights, plain or
    FSDP2-sharded others), which its foreach kernels cannot stack: one total norm per mesh, combined.
    Returns the total norm."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p, "device_mesh", None), []).append(p)
    parts = list(by_mesh.values())
    norms = [get_total_norm([p.grad for p in part]) for part in parts]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for part in parts:
        clip_grads_with_norm_(part, max_norm, total)
    return total


def count_step(impl, index: int) -> tuple[float, dict]:
    with comm.CommRecorder(impl.phase) as recorder:
        loss = impl.step(index)
    return loss, {"bytes_sent": recorder.total(), "calls": recorder.calls, "counts": recorder.counts}


def measure(rank: int, args) -> dict:
    """Runs on every rank; rank 0's result is the summary (step times: slowest rank)."""
    cfg, tokens = configs(args), args.batch * args.seq_len
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(args.seed)
    )
    batch = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    builders = {"ours": lambda: build_ours(cfg, batch), "pytorch": lambda: build_pytorch(cfg, batch)}
    done = harness.contest(rank, builders, LABELS, args.warmup, args.steps, count_step)
    impls = {name: done.summary(name) | figures[0] for name, figures in done.counted.items()}
    for r in impls.values():
        r["tokens_per_s"] = tokens / r["median_s"]
    a = analytic_bytes(cfg, args.batch, args.seq_len)
    s = {"d_ff": d_ff_of(cfg.model), "impls": impls, "analytic": a, "errors": done.errors}
    s |= {
        "measured_bytes": impls["ours"]["bytes_sent"],
        "analytic_bytes": a.total,
        "formulas_bytes": a.formulas,
    }
    s["bytes_match"] = s["measured_bytes"] == a.total
    if "pytorch" in impls:
        ours, theirs = impls["ours"], impls["pytorch"]
        s["ratio"], s["ratio_mean"] = ours["median_s"] / theirs["median_s"], ours["mean_s"] / theirs["mean_s"]
        s["loss_gap"] = done.loss_gap("ours", "pytorch")
    return s


def format_table(s: dict) -> str:
    c = s["config"]
    lines = [
        *harness.banner(
            f"tensor parallelism: tp={c['tp']} sp={c['sp']}",
            c["tp"],
            f"{report.model_line(c, s['d_ff'])} | batch={c['batch']} seq_len={c['seq_len']} "
            f"({c['batch'] * c['seq_len']} tokens/step)",
        ),
        f"{c['steps']} timed steps each after {c['warmup']} warm-up + 1 counting step, the two alternating; "
        f"step time = slowest rank",
        "",
        f"{'implementation':<18}{'median ms':>10}{'mean ms':>10}{'tokens/s':>10}"
        f"{'loss step 1':>13}{'loss last':>11}",
    ]
    for name, r in s["impls"].items():
        lines.append(
            f"{LABELS[name]:<18}{1e3 * r['median_s']:>10.1f}{1e3 * r['mean_s']:>10.1f}"
            f"{r['tokens_per_s']:>10.0f}{r['losses'][0]:>13.5f}{r['losses'][-1]:>11.5f}"
        )
    if "ratio" in s:
        lines += [
            f"ratio ours / PyTorch step time: {s['ratio']:.3f} (median), {s['ratio_mean']:.3f} (mean); "
            f"lower is better for us",
            f"losses over all {1 + c['warmup'] + c['steps']} steps (same batch, after updates): largest "
            f"relative difference ours / PyTorch {s['loss_gap']:.1e}",
        ]
    lines += [f"{LABELS[name]} not measured: {error}" for name, error in s["errors"].items()]
    a: Analytic = s["analytic"]
    w, mib = 80, report.mib
    lines += ["", "bytes sent per rank per step (ring costs, docs/formulas.md), ours:"]
    lines += [f"  {label:<{w}}{mib(value):>9} MiB" for label, value in a.terms]
    lines += [
        f"  {'docs/formulas.md per-layer figure x layers (4 all-reduces of b*s*h per layer)':<{w}}"
        f"{mib(a.formulas):>9} MiB",
        f"  {'analytic total for our model':<{w}}{mib(a.total):>9} MiB",
        f"  {'measured (collectives recorded at the dispatcher in the counting step)':<{w}}"
        f"{mib(s['measured_bytes']):>9} MiB",
        f"  measured / analytic = {float(s['measured_bytes'] / a.total):.6f}; "
        f"measured == analytic: {s['bytes_match']} "
        f"({float(s['measured_bytes']):.0f} B vs {float(a.total):.0f} B); "
        f"analytic / docs/formulas.md = {float(a.total / a.formulas):.4f}",
    ]
    if "pytorch" in s["impls"]:
        p = s["impls"]["pytorch"]["bytes_sent"]
        lines.append(
            f"  {'PyTorch measured (DTensor functional collectives at the dispatcher)':<{w}}{mib(p):>9} MiB"
        )
    lines += ["", "collectives per step"]
    calls = {LABELS[name]: r["calls"] for name, r in s["impls"].items()}
    counts = {LABELS[name]: r["counts"] for name, r in s["impls"].items()}
    lines += comm.tally_lines(calls, 18, 24, counts)
    if c["sp"] and "pytorch" in s["impls"]:
        lines.append(
            "  (PyTorch leaves the norm gains' gradients Partial after backward; every AdamW foreach op that "
            "reads one\n   redistributes it, hence its optimizer-step all-reduces)"
        )
    return "\n".join(lines)


def csv_rows(s: dict) -> list[dict]:
    """One summary row per implementation."""
    keys = ("tp", "sp", "d_model", "n_layers", "n_heads", "seq_len", "batch", "vocab", "steps", "warmup")
    figures = {k: s.get(k) for k in ("ratio", "loss_gap", "analytic_bytes", "formulas_bytes")}
    return [
        {k: s["config"][k] for k in keys} | {"impl": name} | report.flat(r) | figures
        for name, r in s["impls"].items()
    ]


def add_arguments(p) -> None:
    p.add_argument("--sp", action="store_true", help="sequence parallelism too (both implementations)")


def configs(args):
    """The config of both models: tp ranks (with --sp, sequence parallelism), one batch of --batch rows."""
    batch = [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}"]
    return harness.config_of(
        args, [f"parallel.tp={args.tp}", f"parallel.sp={str(args.sp).lower()}", *batch], args.tp
    )


parse_args, run, main = harness.commands(
    __name__,
    "dtrain's tensor parallelism against PyTorch's (DTensor), same model and batch, one run",
    "--tp",
    "tensor parallelism",
    steps=20,
    warmup=3,
    model={"n_layers": 4, "seq_len": 256, "batch": ("--batch", 8, None)},
)

if __name__ == "__main__":
    raise SystemExit(main())

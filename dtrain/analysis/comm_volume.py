"""What one training step communicates, predicted from the config: calls and bytes sent by one rank per
(grid axis, op), the figures parallel.ledger.CommLedger measures (tests/equivalence/test_ledger.py holds
them equal).

    predict(cfg, rank=0) -> Volume        cfg validated for its world; rank: whose view (pipeline stage,
                                          data-parallel shard)

Bytes are ring costs (docs/formulas.md, "Communication per rank per step"): all-reduce 2(n-1)/n*S, all-gather
and reduce-scatter (n-1)/n*S with S the full (gathered) size, point-to-point the tensor sent, all-to-all
the rows leaving the rank. Everything is read off what this rank builds: dtrain.parallelize on the meta
device (dtrain.analysis.estimate.meta_rank) gives its chunks with their shapes (tensor shards, padded
vocabulary, its experts) and the gradient synchronisation with its real buckets, shards and units, so
padding and bucket boundaries are exact. Per step, for the layouts the trainer runs:

  pipeline      every forward of a chunk that is not the last sends b*s*h activations to the next rank,
                every backward of a chunk that is not the first sends their gradient back (s/t under SP):
                b*s*h per boundary per micro-batch each way, v times with interleaving
  tensor        per micro-batch, per block: 2 all-reduces of b*s*h forward (row outputs) and 2 backward
                (copy_to_tp entries); under SP each becomes an all-gather plus a reduce-scatter. Besides
                (bench/tensor_parallel.py's count): the embedding's output reduction, the head entry, the
                vocabulary-parallel loss's 3 all-reduces of b*s. An MoE block's MLP is no region: tokens
                are split over tp instead (all-gather of the output and of the input gradient without SP)
                plus an all-gather of tp*k*E int64 counts. After backward one all-reduce sums the
                partial gradients (SP norm gains, replicated k/v, router and experts)
  context       per attention layer and micro-batch (parallel.context_parallel's ring): forward,
                cp-1 steps each sending the held K and V blocks (b * kv heads * s/cp * head dim each) to
                the next cp rank; backward, the same K/V sends and as many dK/dV partial sums (one hop
                behind). Every other activation above is the rank's s/cp tokens
                MoE blocks add an all-gather of the routing counts of every rank's runs of tokens
  experts       per MoE block and micro-batch: a count exchange (E int64) and 4 all-to-alls of rows
                (dispatch, combine, and their adjoints in backward). Rows depend on the routing: pass the
                exact (leaving, arriving) totals as `moe_rows`, else the balanced figure
                (ep-1)/ep*T*k rows each way is used (docs/formulas.md) and the key is marked `estimated`
  gradients     DDP: one all-reduce per bucket (dense over dp, experts over edp); ZeRO 1: one
                reduce-scatter per padded bucket, ZeRO 2: one per micro-batch, both + one all-gather
                after the step; ZeRO 3: per micro-batch each unit is gathered once per forward use and
                once for backward, and reduce-scattered once. All of these run over the shard group
                (dp_shard when parallel.dp_shard < dp); hybrid sharding adds one all-reduce of each
                bucket's gradient shard per step over the replicas (axis dp_replicate, edp_replicate)
  the rest      gradient-norm all-reduces of one scalar (dp under ZeRO, ep, tp, pp), tied embeddings
                across pipeline ends summed over the embed group
  bookkeeping   the loss sum (pp, dp, cp) and the MoE routing statistics (world), tallied apart

Activation checkpointing recomputes each block's forward inside backward, issuing its forward
collectives (tensor and expert) again, all but a last reduction that nothing saved for backward needs
(`_block_collectives` says which). ZeRO figures depend on the rank's data-parallel shard (which of its
elements are tensor-partial), pipeline ones on its stage, hence `rank`.

With train.precision bf16/fp16 (16-bit parameters, parallel.mixed_precision) every activation and
activation gradient above travels in 2 bytes (pipeline sends, tensor-parallel regions, the embedding and
head collectives, K/V blocks, MoE rows); the vocabulary-parallel loss's reductions, the dK/dV ring sums,
the gradient norms and the loss sum stay fp32, the routing counts int64 and the statistics float64;
ZeRO-3 gathers 16-bit parameters, gradients move in parallel.grad_dtype. The ledger tests measure each.

Not modelled, raising NotModelled: ZeRO 2/3 with the interleaved schedule, ZeRO 3 with ep > 1, ZeRO 3
with frozen parameters. A skipped fp16 step (overflow) sends no ZeRO
all-gather; the prediction assumes none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from dtrain.analysis.estimate import meta_rank
from dtrain.config import Config, microbatches_per_rank
from dtrain.data import packs_documents
from dtrain.model import Transformer, is_moe_block
from dtrain.parallelize import Parallelized
from dtrain.stage import n_chunks
from parallel.context_parallel import ring_send_bytes
from parallel.data_parallel import DataParallelAdamW
from parallel.grid import group_size
from parallel.ledger import (
    ALL_GATHER,
    ALL_REDUCE,
    ALL_TO_ALL,
    BOOKKEEPING,
    RECV,
    REDUCE_SCATTER,
    SEND,
    TRAINING,
    Tally,
    metrics_of,
    ring_bytes,
)
from parallel.precision import DTYPES
from parallel.sharding import sharding_of
from parallel.zero_experts import ZeroWithExperts

ID_BYTES = 8  # expert counts travel as int64


class NotModelled(ValueError):
    """The config uses something the analytic count does not cover; the message names the key."""


@dataclass
class Term:
    section: str
    axis: str
    op: str
    calls: int
    sent: Fraction
    label: str


@dataclass
class Volume:
    """Predicted calls and bytes per (axis, op), for the training traffic and the bookkeeping apart.
    `estimated`: keys whose bytes depend on the data (MoE rows without `moe_rows`)."""

    terms: list[Term] = field(default_factory=list)
    estimated: set[tuple[str, str]] = field(default_factory=set)

    def add(self, axis: str, op: str, calls: int, each: Fraction | int, label: str, section=TRAINING) -> None:
        """`calls` collectives sending `each` bytes apiece; over a group of one rank nothing is sent and
        the ledger records nothing, so callers skip those."""
        if calls:
            self.terms.append(Term(section, axis, op, calls, Fraction(each) * calls, label))

    def ring(self, axis: str, op: str, calls: int, full: int, n: int, label: str, section=TRAINING) -> None:
        """`calls` collectives on S = `full` bytes over `n` ranks, at their ring cost (none when n = 1)."""
        if n > 1:
            self.add(axis, op, calls, ring_bytes(op, full, n), label, section)

    def tallies(self, section: str = TRAINING) -> dict[tuple[str, str], Tally]:
        out: dict[tuple[str, str], Tally] = {}
        for t in self.terms:
            if t.section == section:
                out.setdefault((t.axis, t.op), Tally()).add(t.calls, t.sent)
        return dict(sorted(out.items()))

    def total_bytes(self, section: str = TRAINING) -> Fraction:
        return sum((t.sent for t in self.terms if t.section == section), Fraction(0))

    def metrics(self, prefix: str = "comm") -> dict[str, int | float]:
        """The keys CommLedger.metrics() writes, predicted."""
        return metrics_of(self.tallies(), self.tallies(BOOKKEEPING), prefix)

    def table(self) -> str:
        """Every term, for reading (and for a failing test's message)."""
        rows = [
            f"{t.section:12} {t.axis:6} {t.op:15} {t.calls:6} {float(t.sent):>14,.0f}  {t.label}"
            for t in self.terms
        ]
        return "\n".join(rows)


# --- the prediction ----------------------------------------------------------------------------------------


def _check_modelled(cfg: Config) -> None:
    p, t = cfg.parallel, cfg.train
    if p.zero >= 2 and n_chunks(cfg) > p.pp:
        raise NotModelled(
            f"parallel.zero={p.zero} with parallel.pp_schedule=interleaved: reductions of partly filled "
            f"buckets between chunks are not modelled; use parallel.zero<=1 or another schedule"
        )
    if p.zero == 3 and p.ep > 1:
        raise NotModelled(f"parallel.zero=3 with parallel.ep={p.ep} is not modelled; use parallel.ep=1")
    if p.zero == 3 and (cfg.model.lora.rank or t.freeze):
        raise NotModelled(
            "parallel.zero=3 with frozen parameters: their gathers in backward depend on which unit outputs "
            "carry gradients and are not modelled; use parallel.zero<=2"
        )


def predict(
    cfg: Config,
    rank: int = 0,
    *,
    itemsize: int | None = None,
    moe_rows: tuple[int, int] | None = None,
    built: Parallelized | None = None,
) -> Volume:
    """Calls and bytes global rank `rank` sends in one training step of `cfg` (validated).

    itemsize: bytes per parameter element (default: torch's default dtype, as the model is built).
    moe_rows: (rows leaving, rows arriving) summed over this rank's dispatches of the step (every MoE
    layer and micro-batch, recomputations not counted), from the routing; without it the all-to-all
    bytes are docs/formulas.md's balanced figure and marked estimated. built: what `rank` builds on the
    meta device (dtrain.analysis.estimate.meta_rank), when the caller has it already."""
    _check_modelled(cfg)
    it = itemsize or torch.empty((), dtype=torch.get_default_dtype()).element_size()
    # Activations and their gradients cross tp/pp/cp/ep in the compute dtype: 16 bits with
    # train.precision bf16/fp16 (parameters stored in it, parallel.mixed_precision), else the masters'.
    act = DTYPES[cfg.train.precision].itemsize if cfg.train.precision != "fp32" else it
    built = built or meta_rank(cfg, rank)
    chunks = built.model.chunks
    v = Volume()
    _pipeline(v, cfg, chunks, act)
    _tensor_parallel(v, cfg, chunks, act)
    _context_parallel(v, cfg, chunks, act)
    _experts(v, cfg, chunks, act, moe_rows)
    _gradients(v, cfg, built.grad_sync, it)
    _bookkeeping(v, cfg, it)
    return v


def _pipeline(v: Volume, cfg: Config, chunks: dict[int, Transformer], it: int) -> None:
    """parallel.pipeline: F(c, i) sends its output unless c is the last chunk, B(c, i) the input gradient
    unless c is the first; each receive is matched by a send on the neighbour."""
    p, t = cfg.parallel, cfg.train
    if p.pp == 1:
        return
    m, last = microbatches_per_rank(cfg), n_chunks(cfg) - 1
    seq = t.seq_len // p.cp // (p.tp if p.sp else 1)
    act = t.micro_batch_size * seq * cfg.model.d_model * it
    forward_sends = sum(c != last for c in chunks)
    backward_sends = sum(c != 0 for c in chunks)
    v.add("pp", SEND, m * forward_sends, act, "activations to the next stage, b*s*h per micro-batch")
    v.add("pp", SEND, m * backward_sends, act, "activation gradients to the previous stage")
    v.add("pp", RECV, m * (forward_sends + backward_sends), 0, "the matching receives (bytes on the sender)")


def _block_collectives(sp: bool, moe: bool, dropout: float) -> list[tuple[str, str, str, bool]]:
    """One block's tensor-parallel collectives per micro-batch: (phase, op, what, recomputed), S = b*s*h
    ("counts": the MoE routing counts). `recomputed`: whether activation checkpointing issues it again.
    torch.utils.checkpoint (non-reentrant) stops recomputing once every tensor saved for backward is
    back, and a block's last reduction feeds only dropout (which saves a mask only when p > 0) and the
    residual add, so it is recomputed only with dropout."""
    last = dropout > 0
    if moe and sp:  # tokens are already sequence chunks: only attention is a region
        return [
            ("fwd", ALL_GATHER, "attention entry", True),
            ("fwd", REDUCE_SCATTER, "attention output", True),
            ("fwd", ALL_GATHER, "counts", True),
            ("bwd", REDUCE_SCATTER, "attention entry gradient", False),
            ("bwd", ALL_GATHER, "attention output gradient", False),
        ]
    if moe:  # the layer takes its sequence chunk of the replica and gathers its output back
        return [
            ("fwd", ALL_REDUCE, "attention output", True),
            ("fwd", ALL_GATHER, "counts", True),
            ("fwd", ALL_GATHER, "MoE output (gather_to_replica)", last),
            ("bwd", ALL_REDUCE, "attention entry gradient (copy_to_tp)", False),
            ("bwd", ALL_GATHER, "MoE input gradient (scatter_to_sp)", False),
        ]
    if sp:
        return [
            ("fwd", ALL_GATHER, "attention entry", True),
            ("fwd", REDUCE_SCATTER, "attention output", True),
            ("fwd", ALL_GATHER, "MLP entry", True),
            ("fwd", REDUCE_SCATTER, "MLP output", last),
            ("bwd", REDUCE_SCATTER, "attention entry gradient", False),
            ("bwd", ALL_GATHER, "attention output gradient", False),
            ("bwd", REDUCE_SCATTER, "MLP entry gradient", False),
            ("bwd", ALL_GATHER, "MLP output gradient", False),
        ]
    return [
        ("fwd", ALL_REDUCE, "attention output", True),
        ("fwd", ALL_REDUCE, "MLP output", last),
        ("bwd", ALL_REDUCE, "attention entry gradient (copy_to_tp)", False),
        ("bwd", ALL_REDUCE, "MLP entry gradient (copy_to_tp)", False),
    ]


def _trained(*modules) -> bool:
    return any(q.requires_grad for m in modules if m is not None for q in m.parameters())


def _region_of(what: str) -> tuple[str, str]:
    """The (region, end) a block collective's adjoint belongs to ("MoE input gradient" enters the MLP)."""
    region = "attention" if what.startswith("attention") else "MLP"
    return region, "output" if "output" in what else "entry"


def _gradient_reaches(chunk: Transformer) -> tuple[dict, bool]:
    """Where backward runs a collective's adjoint: only where the gradient arrives, i.e. behind a trained
    parameter (with frozen ones, LoRA or train.freeze, the blocks before the first trained parameter send
    none). Per block, {(region, "entry" | "output"): adjoint runs}, and whether the head entry's does. A
    later chunk's input always carries a gradient (the pipeline sends it back)."""
    flows = chunk.embed is None or _trained(chunk.embed)
    out = {}
    for i, block in chunk.blocks.items():
        runs = {}
        for region, norm, body in (
            ("attention", block.attn_norm, block.attn),
            ("MLP", block.mlp_norm, block.mlp),
        ):
            runs[(region, "entry")] = flows = flows or _trained(norm)
            runs[(region, "output")] = flows = flows or _trained(body)
        out[i] = runs
    return out, chunk.head is not None and (flows or _trained(chunk.norm))


def _tensor_parallel(v: Volume, cfg: Config, chunks: dict[int, Transformer], it: int) -> None:
    p, t, m = cfg.parallel, cfg.train, cfg.model
    n = p.tp
    if n == 1:
        return
    mb = microbatches_per_rank(cfg)
    act = t.micro_batch_size * t.seq_len // p.cp * m.d_model * it  # one (b, s/cp, h) activation
    # The gathered (tp*k, E) int64 counts; under cp the counts of the rank's two runs, (tp*2*k, E).
    counts = n * m.moe.top_k * m.moe.num_experts * ID_BYTES * (2 if p.cp > 1 else 1)
    reaches = {int(i): r for chunk in chunks.values() for i, r in _gradient_reaches(chunk)[0].items()}
    for moe in (False, True):
        blocks = [i for i in reaches if is_moe_block(m, i) == moe]
        for phase, op, what, recomputed in _block_collectives(p.sp, moe, m.dropout):
            again = t.activation_checkpointing and recomputed
            label = f"{'MoE' if moe else 'dense'} blocks: {what} ({phase}{', recomputed' if again else ''})"
            k = len(blocks) if phase == "fwd" else sum(reaches[i][_region_of(what)] for i in blocks)
            v.ring("tp", op, mb * k * (2 if again else 1), counts if what == "counts" else act, n, label)
    embed = mb * sum(chunk.embed is not None for chunk in chunks.values())
    head = mb * sum(chunk.head is not None for chunk in chunks.values())
    embed_back = mb * sum(chunk.embed is not None and _trained(chunk.embed) for chunk in chunks.values())
    head_back = mb * sum(_gradient_reaches(chunk)[1] for chunk in chunks.values())
    if p.sp:
        v.ring("tp", REDUCE_SCATTER, embed, act, n, "embedding output (fwd)")
        v.ring("tp", ALL_GATHER, embed_back, act, n, "embedding output gradient (bwd)")
        v.ring("tp", ALL_GATHER, head, act, n, "head entry (fwd)")
        v.ring("tp", REDUCE_SCATTER, head_back, act, n, "head entry gradient (bwd)")
    else:
        v.ring("tp", ALL_REDUCE, embed, act, n, "embedding output (fwd)")
        v.ring("tp", ALL_REDUCE, head_back, act, n, "head entry gradient, copy_to_tp (bwd)")
    loss = t.micro_batch_size * t.seq_len // p.cp * max(it, 4)  # the loss widens logits to at least fp32
    v.ring("tp", ALL_REDUCE, 3 * head, loss, n, "vocab-parallel loss: max, sum of exp, target logit (fwd)")


def _context_parallel(v: Volume, cfg: Config, chunks: dict[int, Transformer], it: int) -> None:
    """parallel.context_parallel.ring_attention per block and micro-batch: K and V are sent as two
    tensors per ring step (with packed documents their ids as a third), the dK/dV partial sums
    likewise; activation checkpointing runs the forward ring again inside backward (attention's outputs
    are saved, so the recomputation reaches it)."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if p.cp == 1:
        return
    attention = [block.attn for chunk in chunks.values() for block in chunk.blocks.values()]
    again = 2 if t.activation_checkpointing else 1
    # MoE routing (parallel.moe.ContextRouting): the runs' counts, gathered over tp, then over cp.
    moe = sum(is_moe_block(m, int(i)) for chunk in chunks.values() for i in chunk.blocks)
    counts = p.cp * p.tp * 2 * m.moe.top_k * m.moe.num_experts * ID_BYTES
    calls = microbatches_per_rank(cfg) * moe * again
    v.ring("cp", ALL_GATHER, calls, counts, p.cp, "MoE routing: counts of every rank's runs (fwd)")
    for attn in attention[:1]:  # every block's attention has the same shapes
        forward, backward = ring_send_bytes(
            t.micro_batch_size, t.seq_len, p.cp, attn.n_kv_heads, attn.head_dim, it
        )
        calls = microbatches_per_rank(cfg) * len(attention) * 2 * (p.cp - 1)  # K and V: two sends
        v.add("cp", SEND, calls * again, Fraction(forward, 2 * (p.cp - 1)), "ring: K and V blocks (fwd)")
        v.add("cp", SEND, calls, Fraction(forward, 2 * (p.cp - 1)), "ring: K and V blocks again (bwd)")
        v.add("cp", SEND, calls, Fraction(backward - forward, 2 * (p.cp - 1)), "ring: dK and dV sums (bwd)")
        v.add("cp", RECV, calls * (again + 2), 0, "the matching receives (bytes on the sender)")
    if attention and packs_documents(cfg):  # the keys' document ids travel with them, both ways
        ids = microbatches_per_rank(cfg) * len(attention) * (p.cp - 1) * (again + 1)
        each = t.micro_batch_size * t.seq_len // p.cp * ID_BYTES
        v.add("cp", SEND, ids, each, "ring: the K/V blocks' document ids (fwd and bwd)")
        v.add("cp", RECV, ids, 0, "the matching receives (bytes on the sender)")


def _experts(
    v: Volume, cfg: Config, chunks: dict[int, Transformer], it: int, moe_rows: tuple[int, int] | None
) -> None:
    """parallel.expert_parallel.run_experts, per MoE layer and micro-batch: counts exchange, dispatch and
    combine forward; backward runs the adjoints, combine (the dispatch's rows leave again) then dispatch
    (the rows that arrived go back)."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    ep = p.ep
    layers = sum(is_moe_block(m, int(i)) for chunk in chunks.values() for i in chunk.blocks)
    if ep == 1 or not layers:
        return
    calls = microbatches_per_rank(cfg) * layers
    again = 2 if t.activation_checkpointing else 1  # the forward's all-to-alls are recomputed
    exchange = (ep - 1) * (m.moe.num_experts // ep) * ID_BYTES
    v.add("ep", ALL_TO_ALL, calls * again, exchange, "count exchange: E/ep int64 to each peer (fwd)")
    if moe_rows is None:
        # docs/formulas.md: with balanced routing (ep-1)/ep of the T*k routed rows leave (before dropping);
        # T is one tensor rank's share of the micro-batch (tokens are split over tp).
        tokens = t.micro_batch_size * t.seq_len // p.tp // p.cp
        leaving = arriving = Fraction(ep - 1, ep) * tokens * m.moe.top_k * calls
        v.estimated.add(("ep", ALL_TO_ALL))
    else:
        leaving, arriving = moe_rows
    row = m.d_model * it
    out, back = Fraction(leaving * row, calls), Fraction(arriving * row, calls)  # per call, on average
    v.add("ep", ALL_TO_ALL, calls * again, out, "dispatch: the rows that leave (fwd)")
    v.add("ep", ALL_TO_ALL, calls * again, back, "combine: the rows that arrived go back (fwd)")
    v.add("ep", ALL_TO_ALL, calls, out, "combine adjoint: the dispatched rows' gradients (bwd)")
    v.add("ep", ALL_TO_ALL, calls, back, "dispatch adjoint: the arrived rows' gradients (bwd)")


def _axis(group, cp: int) -> str:
    """The ledger's axis name for one of a MetaGrid's groups (dp x cp is "dp" while cp = 1, edp x cp
    "edp")."""
    name = group.group_name
    return name[:-3] if name in ("dp_cp", "edp_cp") and cp == 1 else name


def _gradients(v: Volume, cfg: Config, sync, it: int) -> None:
    if isinstance(sync, DataParallelAdamW):
        _ddp(v, cfg, sync, it)
    else:
        _zero(v, cfg, sync, it)


def _ddp(v: Volume, cfg: Config, sync: DataParallelAdamW, it: int) -> None:
    """parallel.data_parallel.DataParallelAdamW: its buckets' all-reduces, then finish_grad_sync's sums
    and the norm's scalars."""
    p = cfg.parallel
    # parallel.grad_dtype's buckets (fp32 by default, fp64 with fp64 parameters); norms are at least fp32
    grad = sync.buckets.buckets[0].buffer.element_size()
    for b in sync.buckets.buckets:
        v.ring(
            _axis(b.group, p.cp),
            ALL_REDUCE,
            1,
            b.buffer.numel() * grad,
            group_size(b.group),
            "gradient bucket",
        )
    partial = sum(q.numel() for q in sync.params if sharding_of(q).partial_grad)
    v.ring("tp", ALL_REDUCE, int(partial > 0), partial * grad, p.tp, "sum_partial_grads: one flat all-reduce")
    for q in sync.tied:
        v.ring("embed", ALL_REDUCE, 1, q.numel() * grad, 2, "tied embedding gradient")
    # global_grad_norm: one scalar per group holding distinct gradients (only if any is larger than 1).
    for axis, n in (("ep", p.ep), ("tp", p.tp), ("pp", p.pp)):
        v.ring(axis, ALL_REDUCE, 1, max(grad, it), n, "gradient norm: sum of squares")


def _zero(v: Volume, cfg: Config, sync, it: int) -> None:
    """parallel.zero / zero3 / zero_experts: every bucket of every wrapper, as built."""
    p = cfg.parallel
    mb = microbatches_per_rank(cfg)
    for w in sync.parts if isinstance(sync, ZeroWithExperts) else (sync,):
        axis = _axis(w.group, p.cp)
        g = w.buckets[0].grad_shard.element_size() if w.buckets else it  # all frozen: no buckets
        for b in w.buckets:
            # Padded to a multiple of n; parameters move in their dtype (16 bits with train.precision
            # bf16/fp16: ZeRO-3 gathers half the bytes), gradients in parallel.grad_dtype.
            params, grads = b.flat_params.numel() * b.flat_params.element_size(), b.flat_params.numel() * g
            if p.zero == 3:  # gathered before each forward use and once for backward, per micro-batch
                uses = w.residency.uses[id(b)]
                v.ring(axis, ALL_GATHER, mb * (uses + 1), params, w.n, "unit gathered")
            v.ring(axis, REDUCE_SCATTER, 1 if p.zero == 1 else mb, grads, w.n, "gradient bucket")
            if p.zero < 3:
                v.ring(axis, ALL_GATHER, 1, params, w.n, "updated bucket, after the step")
        # _sum_partial_grads: one all-reduce of the tensor-partial ranges of this rank's shards.
        partial = sum(r.stop - r.start for b in w.buckets for r in b.partial)
        v.ring("tp", ALL_REDUCE, int(partial > 0), partial * g, p.tp, "sum_partial_grads on the shards")
        if w.replica_group is not None:  # hybrid sharding: each gradient shard summed over the replicas
            n = group_size(w.replica_group)
            for b in w.buckets:
                shard = b.grad_shard.numel() * b.grad_shard.element_size()
                v.ring(
                    _axis(w.replica_group, p.cp), ALL_REDUCE, 1, shard, n, "gradient shard over the replicas"
                )
        for b in w.buckets:  # the tied parameter's shard over the embed group
            if any(b.params[0] is q for q in w.isolate):
                v.ring("embed", ALL_REDUCE, 1, b.grad_shard.numel() * g, 2, "tied embedding gradient shard")
        v.ring(axis, ALL_REDUCE, 1, it, w.n, "gradient norm: shard squares")
    if isinstance(sync, ZeroWithExperts):  # the experts' squares summed over ep
        v.ring("ep", ALL_REDUCE, 1, it, p.ep, "gradient norm: sum of squares")
    for axis, n in (("tp", p.tp), ("pp", p.pp)):
        v.ring(axis, ALL_REDUCE, 1, it, n, "gradient norm: sum of squares")


def _bookkeeping(v: Volume, cfg: Config, it: int) -> None:
    """The trainer's reductions for its metrics (Trainer._sum_loss, Stage.routing_metrics)."""
    p, m = cfg.parallel, cfg.model
    for axis, n in (("pp", p.pp), ("dp", p.dp), ("cp", p.cp)):
        v.ring(axis, ALL_REDUCE, 1, it, n, "loss sum", BOOKKEEPING)
    layers = sum(is_moe_block(m, i) for i in range(m.n_layers))
    stats = layers * (3 + m.moe.num_experts) * 8  # float64 per layer: aux, z, dropped, per expert
    world = p.dp * p.tp * p.pp * p.cp
    v.ring("world", ALL_REDUCE, int(layers > 0), stats, world, "MoE routing statistics", BOOKKEEPING)

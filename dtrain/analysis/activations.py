"""Activation memory per rank, predicted from the config: the bytes autograd keeps for backward.

Counted tensor by tensor from what our modules save (per token, h = d_model, f = d_ff, a heads, kv the
key/value width, t = tp, V the vocabulary padded to a multiple of t), in bytes, c = the compute dtype's
(4 for fp32; 2 with train.precision bf16/fp16, whose parameters are stored in 16 bits):

  block, without SP      2 norms x (input h, rstd 1, normalised h: widened to fp32, 4 bytes each; the
                         linear layers' input h in c); rotated q h/t, rotated k and v kv/t each (c),
                         softmax statistics a/t (fp32; the fused attention kernel keeps no a*s*s scores),
                         attention output h/t and its reshaped copy h/t (c); SwiGLU: gate and up outputs,
                         silu, their product f/t each (c)
  block, with SP         each norm runs on s/t tokens: (input, rstd, normalised)/t, plus the all-gathered
                         input of the linear layers h
  16-bit norm gains      widened to fp32 per use: 4h per norm and micro-batch
  ends                   token ids (8 bytes; under tp the rank's masked ids and a 1-byte mask); final norm
                         as a block norm; the loss keeps its softmax V/t (4 bytes) and the targets (8
                         bytes; under tp the rank's target shard and two 1-byte masks), plus, without
                         tp, cross_entropy's 4-byte reduction weight per micro-batch
  context parallelism    every count is per token of the rank's seq/cp tokens: ring attention keeps what the
                         fused kernel keeps (q, k, v, its output and the log-sum-exp per head); the
                         rotary tables gathered at the global positions, cos and sin (b, s/cp, d/2) each,
                         are kept once per chunk, shared by its blocks
  checkpointing          a block keeps only its input (h, or h/t under SP); backward recomputes one block
                         at a time, so one block's full set is added once

Key/value heads fewer than t are replicated: each rank keeps the rotated k and (contiguous) v of the one
head its query heads use. This is docs/formulas.md's Korthikanti et al. (2022) count redone for this
Llama block (SwiGLU, RMSNorm, rotary, grouped-query SDPA); tests hold it to the bytes autograd actually
saves (torch.autograd.graph.saved_tensors_hooks) on CPU, for fp32 and 16-bit layouts.

A pipeline rank keeps the activations of the micro-batches in flight on it (GPipe all m, 1F1B at most
pp - r, read from parallel.pipeline_schedules.simulate). MoE blocks depend on routing and are counted
as dense blocks here, and model.qk_norm's per-head norms are not counted (both noted in the report).
"""

from __future__ import annotations

import math

from dtrain.config import Config, d_ff_of, head_dim_of
from dtrain.stage import balanced_split, n_chunks
from parallel import pipeline_schedules

FP32 = 4
INDEX = 8  # int64 token ids and targets


def compute_bytes(cfg: Config) -> int:
    """Bytes of an element in the compute dtype: the parameters' (2 with train.precision bf16/fp16)."""
    return FP32 if cfg.train.precision == "fp32" else 2


def norm_bytes_per_token(cfg: Config) -> float:
    """One RMSNorm: its fp32 (widened) input, rstd and normalised output, on s/t tokens under SP, then the
    next linear layer's input h (all-gathered under SP) in the compute dtype."""
    p, h, c = cfg.parallel, cfg.model.d_model, compute_bytes(cfg)
    widened = FP32 * (2 * h + 1)
    return widened / p.tp + c * h if p.sp else widened + c * h


def norm_weight_bytes(cfg: Config) -> int:
    """Per micro-batch: a 16-bit norm gain widened to fp32 is a new tensor autograd saves (an fp32 gain
    is saved as itself, a parameter)."""
    return FP32 * cfg.model.d_model if compute_bytes(cfg) != FP32 else 0


def block_bytes_per_token(cfg: Config, checkpointed: bool = False) -> float:
    """Bytes one transformer block keeps per token of the micro-batch (the full sequence)."""
    m, p = cfg.model, cfg.parallel
    t, h, f, a = p.tp, m.d_model, d_ff_of(m), m.n_heads
    c = compute_bytes(cfg)
    hd = head_dim_of(m)
    q = a * hd  # the query width: h unless model.head_dim says otherwise
    n_kv = m.n_kv_heads or a
    kv = n_kv * hd
    if checkpointed:
        return c * (h / t if p.sp else h)
    norms = 2 * norm_bytes_per_token(cfg)
    kv_local = kv / t if n_kv >= t else hd  # replicated key/value heads: the one head this rank uses
    attention = c * (q / t + 2 * kv_local + 2 * q / t) + FP32 * a / t  # softmax statistics in fp32
    mlp = c * 4 * f / t
    return norms + attention + mlp


def ends_bytes_per_token(cfg: Config, first: bool, last: bool) -> float:
    """Token ids on the first stage; final norm, logits softmax and targets on the last."""
    m, p = cfg.model, cfg.parallel
    t = p.tp
    out = INDEX + (1 if t > 1 else 0) if first else 0.0
    if last:
        vocab = math.ceil(m.vocab_size / t) * t
        out += norm_bytes_per_token(cfg) + vocab / t * FP32 + INDEX + (2 if t > 1 else 0)
    return out


def activation_bytes(cfg: Config, pp_rank: int = 0) -> dict:
    """Activation bytes on one rank of pipeline stage `pp_rank` (every tensor and data rank of a stage
    holds the same): per micro-batch, the micro-batches in flight, and their product at the peak."""
    p, t = cfg.parallel, cfg.train
    tokens = t.micro_batch_size * t.seq_len // p.cp  # this rank's share of each sequence
    total_chunks = n_chunks(cfg)
    splits = balanced_split(cfg.model.n_layers, total_chunks)
    ckpt = t.activation_checkpointing
    per_microbatch = 0.0
    blocks = 0
    for c, block_ids in enumerate(splits):
        if c % p.pp != pp_rank:
            continue
        blocks += len(block_ids)
        per_token = len(block_ids) * block_bytes_per_token(cfg, ckpt)
        per_token += ends_bytes_per_token(cfg, c == 0, c == total_chunks - 1)
        if p.cp > 1 and block_ids:
            per_token += head_dim_of(cfg.model) * FP32  # cos and sin at the global positions
        per_microbatch += per_token * tokens
        norms = (0 if ckpt else 2 * len(block_ids)) + (c == total_chunks - 1)
        per_microbatch += norms * norm_weight_bytes(cfg)
        if c == total_chunks - 1 and p.tp == 1:
            per_microbatch += FP32  # cross_entropy's reduction weight
    schedule = p.pp_schedule if p.pp > 1 else "1f1b"
    microbatches = t.global_batch_size // (p.dp * t.micro_batch_size)
    actions = pipeline_schedules.build(schedule, p.pp, microbatches, p.pp_virtual_stages)
    in_flight = pipeline_schedules.simulate(actions, p.pp)["peak_in_flight"][pp_rank]
    if p.pp_schedule == "interleaved" and p.pp > 1:
        per_microbatch /= p.pp_virtual_stages  # in-flight counts (chunk, micro-batch) pairs
    recompute = block_bytes_per_token(cfg) * tokens + 2 * norm_weight_bytes(cfg) if ckpt and blocks else 0.0
    return {
        "per_microbatch": per_microbatch,
        "in_flight": in_flight,
        "recompute": recompute,
        "total": per_microbatch * in_flight + recompute,
    }

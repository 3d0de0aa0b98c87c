"""Activation memory per rank, predicted from the config: the bytes autograd keeps for backward.

Counted tensor by tensor from what our modules save (per token, h = d_model, f = d_ff, a heads, kv the
key/value width, t = tp, V the vocabulary padded to a multiple of t), in fp32:

  block, without SP      2 norms x (input h, rstd 1, normalised h, the linear layers' input h) = 6h + 2
                         rotated q h/t, rotated k and v kv/t each, softmax statistics a/t (the fused
                         attention kernel keeps no a*s*s scores), attention output h/t, its reshaped copy
                         h/t; SwiGLU: gate and up outputs, silu, their product f/t each
  block, with SP         each norm runs on s/t tokens: (input, rstd, normalised)/t, plus the all-gathered
                         input of the linear layers h
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
Llama block (SwiGLU, RMSNorm, rotary, grouped-query SDPA) at 4 bytes per element; tests hold it to the
bytes autograd actually saves (torch.autograd.graph.saved_tensors_hooks) on CPU for fp32 layouts.

A pipeline rank keeps the activations of the micro-batches in flight on it (GPipe all m, 1F1B at most
pp - r, read from parallel.pipeline_schedules.simulate). MoE blocks depend on routing and are counted
as dense blocks here, and model.qk_norm's per-head norms are not counted (both noted in the report).
16-bit runs keep most of these tensors in 2 bytes but add autocast's cached 16-bit weight copies; the
figures are the fp32 ones, an upper bound for the rest.
"""

from __future__ import annotations

import math

from dtrain.config import Config, d_ff_of, head_dim_of
from dtrain.stage import balanced_split, n_chunks
from parallel import pipeline_schedules

FP32 = 4
INDEX = 8  # int64 token ids and targets


def block_elements_per_token(cfg: Config, checkpointed: bool = False) -> float:
    """Elements one transformer block keeps per token of the micro-batch (the full sequence)."""
    m, p = cfg.model, cfg.parallel
    t, h, f, a = p.tp, m.d_model, d_ff_of(m), m.n_heads
    hd = head_dim_of(m)
    q = a * hd  # the query width: h unless model.head_dim says otherwise
    n_kv = m.n_kv_heads or a
    kv = n_kv * hd
    if checkpointed:
        return h / t if p.sp else h
    norms = 2 * ((2 * h + 1) / t + h if p.sp else 3 * h + 1)
    kv_local = kv / t if n_kv >= t else hd  # replicated key/value heads: the one head this rank uses
    attention = q / t + 2 * kv_local + a / t + 2 * q / t
    mlp = 4 * f / t
    return norms + attention + mlp


def ends_bytes_per_token(cfg: Config, first: bool, last: bool) -> float:
    """Token ids on the first stage; final norm, logits softmax and targets on the last."""
    m, p = cfg.model, cfg.parallel
    t, h = p.tp, m.d_model
    out = INDEX + (1 if t > 1 else 0) if first else 0.0
    if last:
        vocab = math.ceil(m.vocab_size / t) * t
        norm = (2 * h + 1) / t + h if p.sp else 3 * h + 1
        out += norm * FP32 + vocab / t * FP32 + INDEX + (2 if t > 1 else 0)
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
        per_token = len(block_ids) * block_elements_per_token(cfg, ckpt) * FP32
        per_token += ends_bytes_per_token(cfg, c == 0, c == total_chunks - 1)
        if p.cp > 1 and block_ids:
            per_token += head_dim_of(cfg.model) * FP32  # cos and sin at the global positions
        per_microbatch += per_token * tokens
        if c == total_chunks - 1 and p.tp == 1:
            per_microbatch += FP32  # cross_entropy's reduction weight
    schedule = p.pp_schedule if p.pp > 1 else "1f1b"
    microbatches = t.global_batch_size // (p.dp * t.micro_batch_size)
    actions = pipeline_schedules.build(schedule, p.pp, microbatches, p.pp_virtual_stages)
    in_flight = pipeline_schedules.simulate(actions, p.pp)["peak_in_flight"][pp_rank]
    if p.pp_schedule == "interleaved" and p.pp > 1:
        per_microbatch /= p.pp_virtual_stages  # in-flight counts (chunk, micro-batch) pairs
    recompute = block_elements_per_token(cfg) * FP32 * tokens if ckpt and blocks else 0.0
    return {
        "per_microbatch": per_microbatch,
        "in_flight": in_flight,
        "recompute": recompute,
        "total": per_microbatch * in_flight + recompute,
    }

"""Context parallelism: each micro-batch's sequence split over the cp group, attention as a ring.

Load balance. The sequence of S tokens is cut into 2n chunks of S / (2n) tokens (n = cp); cp rank r holds
chunks r and 2n-1-r, in that order. Under causal attention query chunk i attends to key chunks 0..i, so
rank r's two chunks cost (r + 1) + (2n - r) = 2n + 1 blocks: the same on every rank. Everything outside
attention (norms, MLP, head, loss) runs on the rank's own S / n tokens; rotary angles use the global
positions (`local_positions`), which the model takes as per-token `positions`.

Ring attention. For a query row t with keys split into blocks b, attention is

    o_t = sum_b exp(L_b - L) o_b,   L = log sum_b exp(L_b),   L_b = logsumexp_j (q_t . k_j / sqrt(d))

with o_b the softmax-weighted values of block b alone: partial outputs merge exactly through their
log-sum-exps. Forward: each rank computes its queries against its own key/value block, then n - 1 times
sends the block it holds to rank r+1 and receives one from rank r-1 (point-to-point on the cp group,
posted before the computation on the current block so that the transfer overlaps it). Against key chunk
j, query chunk i takes the full block if j < i, the causal (lower-triangular) block if j == i, and nothing
if j > i. Backward (flash attention's, with the saved L and D = rowsum(dO * O)): the key/value blocks
travel the ring again, and each block's dK/dV partial sums travel with it, one hop behind: the sum
for rank b's block starts on rank b+1 and reaches b after n - 1 hops. Per attention layer and
micro-batch each rank thus sends (n - 1) K/V blocks forward, and (n - 1) K/V blocks plus (n - 1) dK/dV
blocks backward (`ring_send_bytes`). K and V travel in the compute dtype, the dK/dV sums in fp32 (fp64
for fp64 inputs). Every rank posts its sends and receives in the same order on the same peers, so the
point-to-point messages of consecutive exchanges match in order.

Per-block scores are explicit matrices in fp32 (fp64 for fp64 inputs) with autocast off: a fused kernel
returning the log-sum-exp would replace the per-block loops of `_RingAttention` on GPUs. Grouped-query
attention groups the query heads of each key/value head, so only n_kv_heads blocks travel.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.grid import group_rank, group_ranks, group_size


def chunks_of(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices (of 2 * cp) that cp rank `cp_rank` holds, in local order."""
    return cp_rank, 2 * cp - 1 - cp_rank


def local_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Global positions of this rank's seq_len / cp tokens (its two chunks, in order)."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"train.seq_len={seq_len} must be divisible by 2*parallel.cp={2 * cp} (load-balanced chunks)"
        )
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunks_of(cp_rank, cp)])


def split_microbatch(microbatch: tuple, cp: int, cp_rank: int) -> tuple:
    """(inputs, targets[, context]) of a whole sequence -> this cp rank's tokens, with their global
    positions added to the context (the model's rotary angles then stay those of the full sequence)."""
    inputs, targets, *context = microbatch
    index = local_positions(inputs.shape[1], cp, cp_rank)
    local = {k: v.index_select(1, index) for k, v in (context[0] if context else {}).items()}
    local.setdefault("positions", index.expand(inputs.shape[0], -1).contiguous())
    return inputs.index_select(1, index), targets.index_select(1, index), local


def token_segments(
    seq_len: int, cp: int, cp_rank: int, tp: int = 1, tp_rank: int = 0
) -> list[tuple[int, int]]:
    """The runs of consecutive global positions, as (start, length), of the tokens a rank holds when its
    cp-local sequence is split again into tp contiguous pieces (sequence parallelism, or MoE layers that
    split tokens over tp); always two entries, the second (seq_len, 0) when the piece is one run."""
    local = local_positions(seq_len, cp, cp_rank)
    piece = local.tensor_split(tp)[tp_rank].tolist()
    runs: list[tuple[int, int]] = []
    for position in piece:
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs + [(seq_len, 0)] * (2 - len(runs))


def ring_send_bytes(batch: int, seq_len: int, cp: int, n_kv_heads: int, head_dim: int, itemsize: int):
    """(forward, backward) bytes one rank sends per attention layer and micro-batch: (cp - 1) K/V blocks
    of seq_len / cp tokens forward; (cp - 1) K/V blocks and (cp - 1) dK/dV blocks backward. K and V are
    `itemsize` bytes an element (the compute dtype), the dK/dV sums at least fp32 (4)."""
    elements = 2 * batch * n_kv_heads * (seq_len // cp) * head_dim  # K and V
    return (cp - 1) * elements * itemsize, (cp - 1) * elements * (itemsize + max(itemsize, 4))


def _blocks(rank: int, source: int, cp: int):
    """(query chunk, key chunk, causal) local chunk pairs to compute when rank `rank` holds the key/value
    block of rank `source`; a key chunk after the query chunk is skipped."""
    for qi, gq in enumerate(chunks_of(rank, cp)):
        for ki, gk in enumerate(chunks_of(source, cp)):
            if gk <= gq:
                yield qi, ki, gk == gq


def _scores(q, k, causal: bool, scale: float, q_doc=None, k_doc=None) -> torch.Tensor:
    """q: (b, kv, g, c, d), k: (b, kv, c, d) -> (b, kv, g, c, c), -inf above the diagonal if causal and,
    with document ids (b, c) of the queries and keys, -inf between different documents."""
    s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        upper = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(upper, float("-inf"))
    if q_doc is not None:
        other = q_doc[:, None, None, :, None] != k_doc[:, None, None, None, :]
        s = s.masked_fill(other, float("-inf"))
    return s


def _finite(x: torch.Tensor) -> torch.Tensor:
    """x with -inf (a query that sees no key of a block: another document) as 0, so exp(s - x) is 0."""
    return x.masked_fill(x == float("-inf"), 0.0)


def _exchange(tensors: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list]:
    """Post sends of `tensors` to the next rank of the ring and receives of as many from the previous one
    (point-to-point on the cp group); returns the receive buffers and the requests to `_wait` on."""
    ranks, r = group_ranks(group), group_rank(group)
    n = len(ranks)
    tensors = [t.contiguous() for t in tensors]  # keys and values come out of a transpose
    buffers = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, ranks[(r + 1) % n], group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, ranks[(r - 1) % n], group) for b in buffers]
    return buffers, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works:
        work.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, doc_ids):
        n, r = group_size(group), group_rank(group)
        b, h, s, d = q.shape
        kv = k.shape[1]
        c, scale = s // 2, 1.0 / math.sqrt(d)
        wide = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            qw = q.to(wide).reshape(b, kv, h // kv, s, d)
            out = torch.zeros_like(qw)
            lse = torch.full(qw.shape[:-1], float("-inf"), dtype=wide, device=q.device)
            held = [k, v] if doc_ids is None else [k, v, doc_ids]  # document ids travel with their keys
            for step in range(n):
                source = (r - step) % n
                if step < n - 1:  # the next block travels while this one is computed
                    incoming, works = _exchange(held, group)
                kw, vw = (t.to(wide) for t in held[:2])
                for qi, ki, causal in _blocks(r, source, n):
                    qs, ks = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
                    docs = () if doc_ids is None else (doc_ids[:, qs], held[2][:, ks])
                    scores = _scores(qw[..., qs, :], kw[..., ks, :], causal, scale, *docs)
                    block_lse = torch.logsumexp(scores, dim=-1)
                    weights = torch.exp(scores - _finite(block_lse).unsqueeze(-1))
                    block_out = torch.matmul(weights, vw[..., ks, :].unsqueeze(2))
                    # Log-sum-exp merge of the running result with this block's.
                    merged = torch.logaddexp(lse[..., qs], block_lse)
                    keep = torch.exp(lse[..., qs] - _finite(merged)).unsqueeze(-1)
                    take = torch.exp(block_lse - _finite(merged)).unsqueeze(-1)
                    out[..., qs, :] = out[..., qs, :] * keep + block_out * take
                    lse[..., qs] = merged
                if step < n - 1:
                    _wait(works)
                    held = incoming
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.group = group
        return out.reshape(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        group = ctx.group
        n, r = group_size(group), group_rank(group)
        b, h, s, d = q.shape
        c, scale = s // 2, 1.0 / math.sqrt(d)
        wide = out.dtype
        with torch.autocast(q.device.type, enabled=False):
            qw = q.to(wide).reshape(out.shape)
            dout = grad_out.to(wide).reshape(out.shape)
            delta = (dout * out).sum(-1)  # D = rowsum(dO * O)
            dq = torch.zeros_like(qw)
            own_dk = own_dv = None
            held, travelling = ([k, v] if doc_ids is None else [k, v, doc_ids]), None
            for step in range(n):
                source = (r - step) % n
                if step < n - 1:
                    incoming, works = _exchange(held, group)
                kw, vw = (t.to(wide) for t in held[:2])
                dk, dv = torch.zeros_like(kw), torch.zeros_like(vw)
                for qi, ki, causal in _blocks(r, source, n):
                    qs, ks = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
                    docs = () if doc_ids is None else (doc_ids[:, qs], held[2][:, ks])
                    scores = _scores(qw[..., qs, :], kw[..., ks, :], causal, scale, *docs)
                    p = torch.exp(scores - lse[..., qs].unsqueeze(-1))
                    do = dout[..., qs, :]
                    dv[..., ks, :] += torch.matmul(p.transpose(-1, -2), do).sum(2)
                    dp = torch.matmul(do, vw[..., ks, :].unsqueeze(2).transpose(-1, -2))
                    ds = p * (dp - delta[..., qs].unsqueeze(-1)) * scale
                    dq[..., qs, :] += torch.matmul(ds, kw[..., ks, :].unsqueeze(2))
                    dk[..., ks, :] += torch.matmul(ds.transpose(-1, -2), qw[..., qs, :]).sum(2)
                if step == 0:
                    own_dk, own_dv = dk, dv
                else:
                    # The partial sums of `source`'s block: add what the previous rank sent, pass it on.
                    if travelling is not None:
                        dk, dv = dk + travelling[0], dv + travelling[1]
                    travelling, dkv_works = _exchange([dk, dv], group)
                    _wait(dkv_works)
                if step < n - 1:
                    _wait(works)
                    held = incoming
            if travelling is not None:  # after n - 1 hops, this rank's own block's sums came home
                own_dk, own_dv = own_dk + travelling[0], own_dv + travelling[1]
        return dq.reshape(b, h, s, d).to(q.dtype), own_dk.to(k.dtype), own_dv.to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, doc_ids=None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence held by the cp group.
    q: (batch, heads, seq/cp, head_dim); k, v: (batch, kv_heads, seq/cp, head_dim), kv_heads dividing
    heads; the local sequence is the rank's two load-balanced chunks (`local_positions`). doc_ids
    (batch, seq/cp): packed documents, a query then sees only keys of its own document (the ids travel
    the ring with their keys)."""
    if group_size(group) == 1:
        raise ValueError("ring_attention needs a context-parallel group of at least two ranks")
    if q.shape[2] % 2:
        raise ValueError(f"the local sequence ({q.shape[2]} tokens) must be two chunks of equal length")
    return _RingAttention.apply(q, k, v, group, doc_ids)

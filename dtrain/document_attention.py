"""Attention inside packed documents: query t sees key j when j <= t and both lie in one document.

Two kernels, one mask. A boolean (batch, 1, seq, seq) mask through scaled_dot_product_attention is exact
everywhere but materialises seq x seq per row and rules out the flash kernel. On CUDA the same mask is a
flex-attention BlockMask instead: per (128 x 128) block of queries and keys it records whether the block
is empty, full or partial, so empty blocks (other documents, the future) are skipped and only partial
blocks evaluate the mask, never materialised. flex attention has no dropout, so attention dropout in
training takes the boolean path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class DocumentMask:
    """The document mask of one micro-batch, built once per forward and shared by every layer."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids  # (batch, seq): equal ids = one document; padding has its own id
        self._dense: torch.Tensor | None = None
        self._blocks = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            ids, s = self.doc_ids, self.doc_ids.shape[-1]
            causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
            self._dense = (causal & (ids.unsqueeze(-1) == ids.unsqueeze(-2))).unsqueeze(1)
        return self._dense

    def blocks(self):
        from torch.nn.attention.flex_attention import create_block_mask

        if self._blocks is None:
            ids = self.doc_ids

            def same_document_causal(b, h, q, k):
                return (k <= q) & (ids[b, q] == ids[b, k])

            b, s = ids.shape
            self._blocks = create_block_mask(same_document_causal, b, None, s, s, device=ids.device)
        return self._blocks


@functools.cache
def _compiled_flex_attention():
    """flex attention is only fast compiled (eager, it computes every score); compiled on first use."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, mask: DocumentMask, enable_gqa: bool, compiled: bool = True) -> torch.Tensor:
    """flex attention under the mask's blocks; `compiled=False` runs it eagerly (forward only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    kernel = _compiled_flex_attention() if compiled else flex_attention
    return kernel(q, k, v, block_mask=mask.blocks(), enable_gqa=enable_gqa)


def attend(q, k, v, mask, dropout_p: float, enable_gqa: bool) -> torch.Tensor:
    """Causal attention of (batch, heads, seq, head_dim) tensors under `mask`: None (plain causal), a
    boolean tensor (a KV cache's), or a DocumentMask."""
    if isinstance(mask, DocumentMask):
        if q.is_cuda and dropout_p == 0.0:
            return flex(q, k, v, mask, enable_gqa)
        mask = mask.dense()
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=enable_gqa
    )

"""The two kernels of packed-document attention compute the same thing: flex attention under the
BlockMask that CUDA uses, run eagerly here (flex attention has no CPU backward, so values only), equals
scaled_dot_product_attention under the boolean mask, which equals per-document causal attention computed
one document at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtrain.document_attention import DocumentMask, attend, flex
from tests.tolerances import FP64

DOCS = torch.tensor([[1] * 5 + [2] * 7 + [3] * 3 + [0], [4] * 16])  # packed rows; 0: padding


def _qkv(heads=4, kv_heads=2, seq=16, dim=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, seq, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, seq, dim, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def test_the_boolean_path_is_causal_attention_inside_each_document():
    q, k, v = _qkv()
    out = attend(q, k, v, DocumentMask(DOCS), 0.0, enable_gqa=True)
    for row in range(2):
        for doc in DOCS[row].unique():
            at = (DOCS[row] == doc).nonzero().squeeze(1)
            alone = F.scaled_dot_product_attention(
                q[row, :, at], k[row, :, at], v[row, :, at], is_causal=True, enable_gqa=True
            )
            torch.testing.assert_close(out[row, :, at], alone, **FP64)


@pytest.mark.filterwarnings("ignore:.*without torch.compile")  # eager on purpose: no CPU compile
@torch.no_grad()
def test_flex_attention_under_the_block_mask_equals_the_boolean_mask():
    q, k, v = _qkv()
    mask = DocumentMask(DOCS)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)
    torch.testing.assert_close(flex(q, k, v, mask, enable_gqa=True, compiled=False), dense, **FP64)

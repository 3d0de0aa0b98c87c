"""Two models none of us wrote, for the tests of parallel/wrap.py: transformers' LlamaForCausalLM from a
small config (tied embeddings, grouped-query attention) and a causal language model around
torch.nn.TransformerEncoder. transformers is a test-only dependency, imported here and nowhere in
parallel/ or dtrain/."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ = 61, 8
KINDS = ("llama", "encoder")


class EncoderLM(nn.Module):
    """Embedding, a stack of torch's TransformerEncoderLayer under a causal mask, a linear head.

    bias=False drops the layers' biases. The key part of attention's in_proj_bias has an analytically
    zero gradient (softmax does not change when one query's scores all shift by q.b_k), so in fp32 its
    gradient is rounding noise near AdamW's eps, which the update turns into about +-lr with a sign set
    by summation order: fp32 comparisons with another summation order need the biases off; in float64
    the noise is far below eps and the biases stay."""

    def __init__(self, width: int = 16, layers: int = 2, bias: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(
            width, 2, dim_feedforward=32, dropout=0.0, batch_first=True, bias=bias
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
        return self.head(self.encoder(self.embed(tokens), mask=causal))


def llama_config(**overrides):
    import transformers

    options = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "tie_word_embeddings": True,
        "attn_implementation": "eager",
    }
    return transformers.LlamaConfig(**{**options, **overrides})


def build(kind: str, dtype: torch.dtype = torch.float64, **overrides) -> nn.Module:
    """The same initial weights on every call (and every rank)."""
    torch.manual_seed(0)
    if kind == "llama":
        import transformers

        model = transformers.LlamaForCausalLM(llama_config(**overrides))
    else:
        model = EncoderLM(**overrides)
    return model.to(dtype)


def unit_classes(kind: str) -> list:
    """ZeRO-3 units as a policy: every block, and the model itself for embedding, final norm and head."""
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return [LlamaDecoderLayer]
    return [nn.TransformerEncoderLayer]


def logits(kind: str, model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's forward as its users call it (`model` may be a wrapper around it)."""
    if kind == "llama":
        return model(input_ids=tokens, use_cache=False).logits
    return model(tokens)


def loss_of(kind: str, model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch of (rows, SEQ + 1) tokens."""
    out = logits(kind, model, tokens[:, :-1])
    return F.cross_entropy(out.flatten(0, 1), tokens[:, 1:].flatten())

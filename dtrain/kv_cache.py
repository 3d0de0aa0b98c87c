"""Keys and values of earlier tokens, kept across forward calls so that generation runs the prompt once
(prefill) and then one new token per call, instead of the whole sequence again for every token.

Each attention layer's keys and values are stored after the rotation, once per key/value head (grouped
query heads share them: attention expands them, the cache never does), in buffers of the final length
allocated on first use. Rows may start with left padding: `feed(valid)` marks which of the next tokens are
real. A token's rotary position counts the real tokens before it in its row, so every sequence starts at
position 0 at its first real token whatever its padding (as transformers does with position ids taken
from the attention mask), and a query sees the real keys up to itself, never padding. A padding query sees
itself only, which keeps its softmax finite (its output is never read).

Protocol, for a Transformer `model` (dtrain.model):

    cache = KVCache(max_len)
    logits = model(prompt, cache=cache.feed(prompt_mask))     # prefill
    logits = model(next_tokens, cache=cache.feed(ones))       # one column per call from then on
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions held
        self.valid: torch.Tensor | None = None  # (batch, length) bool: real tokens, False for padding
        self._kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fed: torch.Tensor | None = None

    def feed(self, valid: torch.Tensor) -> KVCache:
        """Announce the next forward's tokens: `valid` (batch, new) is True for real tokens. Returns the
        cache, to pass as the model's `cache` argument."""
        new = valid.shape[1]
        if self.length + new > self.max_len:
            raise ValueError(f"{self.length} cached + {new} new tokens exceed the cache's {self.max_len}")
        full = valid.bool() if self.valid is None else torch.cat([self.valid, valid.bool()], dim=1)
        end = self.length + new
        keys = torch.arange(end, device=valid.device)
        queries = keys[self.length :, None]
        causal = keys[None, :] <= queries  # (new, end)
        # (batch, 1, new, end): broadcast over heads, as scaled_dot_product_attention takes it
        self.mask = (causal & (full[:, None, :] | (keys[None, :] == queries)))[:, None]
        self.positions = (full.long().cumsum(dim=1) - 1).clamp(min=0)[:, self.length :]
        self._fed = full
        return self

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' rows of the rotary tables, (batch, 1, new, head_dim / 2): one angle per token,
        broadcast over heads."""
        if self._fed is None:
            raise RuntimeError("KVCache.feed(valid) must announce the tokens of each forward")
        if int(self.positions.max()) >= cos.shape[0]:
            raise ValueError(
                f"position {int(self.positions.max())} is beyond model.max_seq_len={cos.shape[0]}"
            )
        return cos[self.positions][:, None], sin[self.positions][:, None]

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys and values, (batch, kv_heads, new, head_dim); return all of them so
        far and the attention mask."""
        b, heads, new, dim = k.shape
        if layer not in self._kv:
            shape = (b, heads, self.max_len, dim)
            self._kv[layer] = (k.new_zeros(shape), v.new_zeros(shape))
        keys, values = self._kv[layer]
        end = self.length + new
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end], self.mask

    def advance(self) -> None:
        """After the forward: the fed tokens are cached."""
        self.valid, self.length = self._fed, self._fed.shape[1]
        self._fed = None

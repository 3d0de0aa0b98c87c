"""Decoder-only transformer of the Llama family.

Token embedding -> n_layers x [RMSNorm -> grouped-query attention with rotary embeddings -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output head -> token cross-entropy (summed).

Parallel versions replace parts, not the model: every linear layer, the embedding, the head, the loss and
the MLP come from a `Layers` object (tensor-parallel and MoE issues subclass it), and a pipeline stage is
the same `Transformer` built with a range of blocks and with or without the embedding and the head. Block
names carry the global layer index (`blocks.7.attn.wq.weight`), so parameter names are canonical in every
layout, which is what initialisation and checkpoints key on.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dtrain.config import LORA_TARGETS, ModelConfig, RopeScalingConfig, d_ff_of, head_dim_of, lora_targets
from dtrain.document_attention import DocumentMask, attend
from parallel.context_parallel import ring_attention
from parallel.lora import LoRALinear, adapter_init, is_adapter
from parallel.moe import MoELayer
from parallel.precision import wide
from parallel.sharding import sharding_of


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (the mean of squares underflows in bf16), cast back to the compute dtype.
        return F.rms_norm(wide(x), (x.shape[-1],), wide(self.weight), self.eps).type_as(x)


def rotary_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """theta^(-2i/d) per pair of dimensions; with Llama 3.1's scaling the low frequencies (wavelengths
    beyond original / low_freq_factor) are divided by `factor`, the high ones (below original /
    high_freq_factor) kept, and the band between interpolated smoothly."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling.type == "none":
        return inv_freq
    s = scaling
    wavelength = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelength > s.original_max_seq_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    band = (wavelength <= s.original_max_seq_len / s.low_freq_factor) & (
        wavelength >= s.original_max_seq_len / s.high_freq_factor
    )
    return torch.where(band, interpolated, out)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None):
    """(cos, sin) of every position's angle per pair: (max_seq_len, head_dim / 2) each."""
    inv_freq = rotary_frequencies(head_dim, theta, scaling or RopeScalingConfig())
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    dtype = torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle (the "rotate half" form of RoPE).
    x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim / 2)."""
    x1, x2 = wide(x).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are column layers, down a row layer."""

    def __init__(self, d_model: int, d_ff: int, layers: Layers):
        super().__init__()
        self.w1 = layers.column(d_model, d_ff)  # gate
        self.w3 = layers.column(d_model, d_ff)  # up
        self.w2 = layers.row(d_ff, d_model)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TokenCrossEntropy(nn.Module):
    """Sum (not mean) of token losses: the trainer divides by the global token count, so accumulation,
    data and pipeline parallelism all see the same normalisation. Targets of -100 are ignored."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            wide(logits).flatten(0, -2), targets.flatten(), reduction="sum", ignore_index=-100
        )


class Layers:
    """Factory of the replaceable parts, dense single-device versions.

    Linear weights are (out_features, in_features) without bias, as in Llama. A "column" layer's output
    features and a "row" layer's input features are what tensor parallelism splits; a block's attention
    and MLP each take their input through `region_entry` and leave through a row layer, which is where a
    tensor-parallel version places its collectives (dtrain.parallel_layers).
    """

    tp_size = 1
    tp_rank = 0

    def __init__(self, ep_group=None, cp_group=None):
        self.ep_group = ep_group  # experts spread over this group (None: all experts local)
        self.cp_group = cp_group  # the sequence split over this group: ring attention (None: whole)

    def column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def replicated_column(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """A column layer every tensor rank holds whole (key/value heads fewer than tensor ranks)."""
        return nn.Linear(in_features, out_features, bias=bias)

    def norm(self, dim: int, eps: float) -> nn.Module:
        return RMSNorm(dim, eps)

    def head_norm(self, head_dim: int, eps: float) -> nn.Module:
        """RMSNorm over each attention head's features (one gain shared by all heads)."""
        return RMSNorm(head_dim, eps)

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        return nn.Embedding(vocab_size, d_model)

    def head(self, d_model: int, vocab_size: int) -> nn.Module:
        return nn.Linear(d_model, vocab_size, bias=False)

    def loss(self) -> nn.Module:
        return TokenCrossEntropy()

    def mlp(self, cfg: ModelConfig, layer_index: int) -> nn.Module:
        return SwiGLU(cfg.d_model, d_ff_of(cfg), self)

    def moe(self, cfg: ModelConfig) -> nn.Module:
        """The mixture-of-experts MLP: whole experts, tokens split over the tensor group (parallel.moe)."""
        m = cfg.moe
        return MoELayer(
            cfg.d_model,
            d_ff_of(cfg),
            m.num_experts,
            m.top_k,
            m.capacity_factor,
            m.aux_loss_coef,
            m.z_loss_coef,
            ep_group=self.ep_group,
            cp_group=self.cp_group,
            **self.moe_tensor_split(),
        )

    def moe_tensor_split(self) -> dict:
        return {}

    def region_entry(self) -> nn.Module:
        """Applied to the normed input of attention, MLP and head."""
        return nn.Identity()

    def split_region_rng(self):
        """Dropout RNG inside tensor-split regions (attention probabilities over local heads)."""
        return contextlib.nullcontext()

    def residual_rng(self):
        """Dropout RNG on the residual stream (split along the sequence under sequence parallelism)."""
        return contextlib.nullcontext()


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads: n_heads / tp query heads; key/value heads split
    the same way when there are at least tp of them, else every rank holds all of them (replicated
    weights) and uses the one its query heads share."""

    def __init__(self, cfg: ModelConfig, layers: Layers):
        super().__init__()
        tp = layers.tp_size
        n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = head_dim_of(cfg)
        self.n_heads = cfg.n_heads // tp
        self.dropout = cfg.dropout
        self.layers = layers
        bias = cfg.qkv_bias
        self.wq = layers.column(cfg.d_model, cfg.n_heads * self.head_dim, bias=bias)
        if n_kv >= tp:
            self.n_kv_heads, self.kv_pick = n_kv // tp, None
            self.wk = layers.column(cfg.d_model, n_kv * self.head_dim, bias=bias)
            self.wv = layers.column(cfg.d_model, n_kv * self.head_dim, bias=bias)
        else:
            self.n_kv_heads = 1
            self.kv_pick = layers.tp_rank * self.n_heads // (cfg.n_heads // n_kv)
            self.wk = layers.replicated_column(cfg.d_model, n_kv * self.head_dim, bias=bias)
            self.wv = layers.replicated_column(cfg.d_model, n_kv * self.head_dim, bias=bias)
        self.wo = layers.row(cfg.n_heads * self.head_dim, cfg.d_model)
        # Qwen3: each query and key head is RMS-normalised over its features before the rotation.
        self.q_norm = layers.head_norm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = layers.head_norm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def _kv(self, proj: nn.Module, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        kv = proj(x).view(b, s, -1, self.head_dim)
        if self.kv_pick is not None:
            kv = kv[:, :, self.kv_pick : self.kv_pick + 1]
        if norm is not None:
            kv = norm(kv)
        return kv.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: DocumentMask | None = None,
        cache=None,
    ) -> torch.Tensor:
        """cos, sin: the rotary tables (max_seq_len, d/2), sliced to this sequence; per-row tables
        (batch, seq, d/2) of packed documents; or a cache's (batch, 1, new, d/2). mask: None for causal
        attention, else a DocumentMask of packed documents (under context parallelism its document ids
        are compared block by block as keys arrive)."""
        b, s, _ = x.shape
        if cos.dim() == 2:
            cos, sin = cos[:s], sin[:s]
        elif cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        k, v = self._kv(self.wk, x, self.k_norm), self._kv(self.wv, x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # generation: this layer's earlier keys and values join the new ones
            k, v, mask = cache.update(self, k, v)
        if self.layers.cp_group is not None and cache is None:
            # This rank holds two chunks of the sequence: causal attention over all of it as a ring (no
            # dropout: config validation refuses it with context parallelism); `mask` is then the
            # document ids, compared block by block as keys arrive.
            doc_ids = mask.doc_ids if mask is not None else None
            out = ring_attention(q, k, v, self.layers.cp_group, doc_ids=doc_ids)
            return self.wo(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))
        with self.layers.split_region_rng():
            dropout = self.dropout if self.training else 0.0
            out = attend(q, k, v, mask, dropout, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


def is_moe_block(cfg: ModelConfig, layer_index: int) -> bool:
    """Every `moe.every_n_layers`-th block (the last of each group of n) has a mixture-of-experts MLP."""
    n = cfg.moe.every_n_layers
    return cfg.moe.num_experts > 0 and layer_index % n == n - 1


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, layers: Layers):
        super().__init__()
        self.attn_norm = layers.norm(cfg.d_model, cfg.norm_eps)
        self.attn_in = layers.region_entry()
        self.attn = Attention(cfg, layers)
        self.mlp_norm = layers.norm(cfg.d_model, cfg.norm_eps)
        if is_moe_block(cfg, layer_index):  # not a tensor-parallel region: it splits tokens itself
            self.mlp_in, self.mlp = nn.Identity(), layers.moe(cfg)
        else:
            self.mlp_in, self.mlp = layers.region_entry(), layers.mlp(cfg, layer_index)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual_rng = layers.residual_rng

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        # The mask and the cache go by keyword: module-input hooks (DTensor's PrepareModuleInput in the
        # benchmark's peer) see the same positional inputs (x, cos, sin) in every use.
        h = self.attn(self.attn_in(self.attn_norm(x)), cos, sin, mask=mask, cache=cache)
        with self.residual_rng():
            x = x + self.dropout(h)
        h = self.mlp(self.mlp_in(self.mlp_norm(x)))
        with self.residual_rng():
            return x + self.dropout(h)


class Transformer(nn.Module):
    """The whole model, or one pipeline stage of it (a range of blocks, with or without the ends).

    forward(tokens or hidden states, targets) returns the token-loss sum when this part holds the head
    and targets are given, logits when it holds the head and no targets are given, else hidden states.
    With a `cache` (a dtrain.kv_cache.KVCache fed the new tokens' mask) the tokens continue the cached
    sequences: generation's prefill, then one token at a time.
    Packed documents add `positions` (batch, seq), each document's rotary positions from 0, and
    `doc_ids` (batch, seq), which keep attention inside a document; every chunk of a pipeline gets both.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: Layers | None = None,
        block_ids: range | None = None,
        has_embedding: bool = True,
        has_head: bool = True,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        layers = layers or Layers()
        block_ids = range(cfg.n_layers) if block_ids is None else block_ids
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = layers.embedding(cfg.vocab_size, cfg.d_model) if has_embedding else None
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i, layers) for i in block_ids})
        self.norm = layers.norm(cfg.d_model, cfg.norm_eps) if has_head else None
        self.head_in = layers.region_entry() if has_head else None
        self.head = layers.head(cfg.d_model, cfg.vocab_size) if has_head else None
        self.loss_fn = layers.loss() if has_head else None
        if cfg.tie_embeddings and has_embedding and has_head:
            self.head.weight = self.embed.weight
        if cfg.lora.rank:
            add_adapters(self, cfg, layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual_rng = layers.residual_rng
        # Ring attention masks documents from their ids: this rank's keys are only part of the sequence.
        cos, sin = rotary_tables(head_dim_of(cfg), cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        if self.embed is not None:
            with self.residual_rng():
                h = self.dropout(self.embed(x))
        else:
            h = x
        cos, sin = self.rope_cos, self.rope_sin  # attention slices them to the full sequence length
        if cache is not None:
            cos, sin = cache.rotary(cos, sin)
        elif positions is not None:
            cos, sin = cos[positions], sin[positions]
        mask = DocumentMask(doc_ids) if doc_ids is not None else None
        for block in self.blocks.values():
            if self.activation_checkpointing and self.training:
                # Keep only the block input; recompute the block in backward (non-reentrant, so the
                # data-parallel gradient hooks fire once per parameter and RNG state is replayed).
                h = checkpoint(block, h, cos, sin, mask, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance()
        if self.head is None:
            return h
        logits = self.head(self.head_in(self.norm(h)))
        return logits if targets is None else self.loss_fn(logits, targets)


def compile_blocks(model: Transformer) -> None:
    """train.compile: every block's forward through torch.compile (inductor), one graph per block.
    Only `forward` is compiled, in place: the module call around it (ZeRO-3's gather and free hooks,
    activation checkpointing's recomputation) stays eager, parameters enter each graph as inputs read at
    call time (never captured storage), and parameter names are unchanged (no `_orig_mod.` prefix).
    Blocks of one shape share their graphs; the first step pays for compiling them."""
    for block in model.blocks.values():
        block.forward = torch.compile(block.forward, fullgraph=True)


def add_adapters(model: Transformer, cfg: ModelConfig, layers: Layers) -> None:
    """model.lora: every targeted projection of every block becomes a parallel.lora.LoRALinear over the
    same parameters, and every parameter but the adapters is frozen (no gradient, no optimizer state)."""
    lora = cfg.lora
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks.values():
        for target in lora_targets(lora):
            parent = block.attn if LORA_TARGETS[target] == "attn" else block.mlp
            if not isinstance(parent, (Attention, SwiGLU)):
                continue  # a mixture-of-experts MLP (validation refuses MLP targets with experts)
            adapted = LoRALinear(
                getattr(parent, target), lora.rank, lora.alpha, lora.dropout, layers.split_region_rng
            )
            setattr(parent, target, adapted)


def _seed_for(seed: int, name: str) -> int:
    # A stable hash: Python's hash() is salted per process, which would break the layout contract.
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def init_value(name: str, shape: tuple[int, ...], seed: int, cfg: ModelConfig) -> torch.Tensor:
    """The canonical initial value of parameter `name`: a function of (seed, name, full shape) only."""
    if is_adapter(name):
        return adapter_init(name, shape, torch.Generator().manual_seed(_seed_for(seed, name) % (2**63)))
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(("attn.wo.weight", "mlp.w2.weight", "experts.w2")):
        std /= math.sqrt(2 * cfg.n_layers)  # residual-branch outputs (GPT-2 scaling)
    gen = torch.Generator().manual_seed(_seed_for(seed, name) % (2**63))
    return torch.randn(shape, generator=gen) * std


def canonical_name(name: str, cfg: ModelConfig) -> str:
    """A tied output head *is* the input embedding, also on a pipeline stage that holds only the head."""
    return "embed.weight" if cfg.tie_embeddings and name == "head.weight" else name


def freeze(model: nn.Module, patterns: list[str]) -> None:
    """train.freeze: parameters whose canonical name matches a pattern (fnmatch) get no gradient."""
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(canonical_name(name, model.cfg), pat) for pat in patterns):
            p.requires_grad_(False)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, read=None) -> None:
    """Fill every parameter from its canonical value, then take this rank's slice (sharding facts); with
    `read(name, sharding)`, this rank's slice of stored weights instead (dtrain.hf.HFWeights.read)."""
    cfg = model.cfg
    for name, p in model.named_parameters():
        s, canonical = sharding_of(p), canonical_name(name, cfg)
        if read and not is_adapter(canonical):  # stored weights hold the base model, not its adapters
            p.copy_(read(canonical, s))
        else:
            p.copy_(s.take(init_value(canonical, s.full_shape, seed, cfg)))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Canonical parameter counts from the config (no model built). `blocks_active`: the block
    parameters one token runs through (top_k of the experts of an MoE block, and its router)."""
    d, v, hd = cfg.d_model, cfg.vocab_size, head_dim_of(cfg)
    kv = cfg.n_kv_heads or cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * kv * hd * 2
    attn += (cfg.n_heads + 2 * kv) * hd if cfg.qkv_bias else 0
    attn += 2 * hd if cfg.qk_norm else 0
    mlp = 3 * d * d_ff_of(cfg)
    n_moe = sum(is_moe_block(cfg, i) for i in range(cfg.n_layers))
    experts, top_k = cfg.moe.num_experts, cfg.moe.top_k
    blocks = cfg.n_layers * (attn + 2 * d) + (cfg.n_layers - n_moe) * mlp + n_moe * (experts * (mlp + d))
    active = blocks - n_moe * (experts - top_k) * mlp
    embedding = v * d
    head = 0 if cfg.tie_embeddings else v * d
    total = embedding + blocks + head + d
    return {"embedding": embedding, "blocks": blocks, "blocks_active": active, "head": head, "total": total}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * H * Q * T (PaLM, appendix B), with N the parameters
    that do matmul work per token (active block parameters, final norm and the output head, which
    multiplies even when it is tied; the input embedding is a lookup), H heads, Q head dim, T sequence
    length."""
    c = count_params(cfg)
    n = c["blocks_active"] + cfg.d_model + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * head_dim_of(cfg) * seq_len

"""The single-process model: shapes and loss, parameter counts, layout-independent initialisation,
causality, rotary embeddings, activation checkpointing, pipeline-stage composition and the FLOP count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import ModelConfig
from dtrain.model import (
    Transformer,
    apply_rotary,
    count_params,
    flops_per_token,
    init_value,
    init_weights,
    rotary_tables,
)
from parallel.sharding import Sharding, set_sharding

SEED = 1234


def small(**overrides) -> ModelConfig:
    base = {"vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}
    return ModelConfig(**{**base, **overrides})


def built(cfg: ModelConfig, seed: int = SEED, **kwargs) -> Transformer:
    model = Transformer(cfg, **kwargs)
    init_weights(model, seed)
    return model


def tokens(cfg: ModelConfig, b: int = 2, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


# --- shapes, loss, attention variants, parameter counts --------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_logits_shape_and_summed_loss(tie):
    cfg = small(tie_embeddings=tie)
    model = built(cfg)
    x, y = tokens(cfg, 3, 10, seed=1), tokens(cfg, 3, 10, seed=2)
    logits = model(x)
    assert logits.shape == (3, 10, cfg.vocab_size) and logits.dtype == torch.float32
    loss = model(x, y)
    assert loss.shape == ()
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    assert torch.equal(loss, expected)
    # A sum, not a mean: about b*s*log(vocab) for a freshly initialised model.
    assert 0.5 * 30 * torch.log(torch.tensor(64.0)) < loss < 2 * 30 * torch.log(torch.tensor(64.0))

    # Targets of -100 are left out of the sum.
    masked = y.clone()
    masked[:, :4] = -100
    expected = F.cross_entropy(logits[:, 4:].flatten(0, 1), y[:, 4:].flatten(), reduction="sum")
    torch.testing.assert_close(model(x, masked), expected, rtol=1e-6, atol=0)


def test_stage_without_head_returns_hidden_states():
    cfg = small()
    stage = built(cfg, block_ids=range(0, 2), has_head=False)
    h = stage(tokens(cfg))
    assert h.shape == (2, 12, cfg.d_model)
    middle = built(cfg, block_ids=range(2, 3), has_embedding=False, has_head=False)
    assert middle(h).shape == h.shape


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_grouped_query_attention_equals_repeated_heads(n_kv):
    """GQA with n_kv key/value heads computes exactly multi-head attention whose key and value heads are
    repeated n_heads / n_kv times (query head i reads kv head i // group)."""
    cfg = small(n_kv_heads=n_kv)
    gqa = built(cfg)
    hd = cfg.d_model // cfg.n_heads
    assert gqa.blocks["0"].attn.wk.weight.shape == (n_kv * hd, cfg.d_model)
    assert gqa.blocks["0"].attn.wv.weight.shape == (n_kv * hd, cfg.d_model)
    mha = Transformer(dataclasses.replace(cfg, n_kv_heads=None))
    group = cfg.n_heads // n_kv
    state = {}
    for name, value in gqa.state_dict().items():
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            value = value.view(n_kv, hd, cfg.d_model).repeat_interleave(group, dim=0).flatten(0, 1)
        state[name] = value
    mha.load_state_dict(state)
    x = tokens(cfg)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {"n_kv_heads": 1, "d_ff": 40},
        {"n_kv_heads": None, "tie_embeddings": True},
    ],
    ids=["untied", "tied", "gqa1-dff40", "mha-tied"],
)
def test_parameter_count(overrides):
    cfg = small(**overrides)
    model = Transformer(cfg)
    counts = count_params(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert counts["embedding"] == cfg.vocab_size * cfg.d_model
    assert counts["head"] == (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    assert counts["blocks"] == blocks


def test_tied_embeddings_share_one_tensor():
    model = built(small(tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and "head.weight" not in names  # counted once
    state = model.state_dict()
    assert "embed.weight" in state and "head.weight" in state
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()
    # A gradient through the head and through the embedding lands on the one tensor.
    cfg = model.cfg
    model(tokens(cfg), tokens(cfg, seed=3)).backward()
    assert model.embed.weight.grad is not None and model.head.weight.grad is model.embed.weight.grad

    untied = built(small())
    assert untied.head.weight is not untied.embed.weight
    assert not torch.equal(untied.head.weight, untied.embed.weight)


# --- initialisation is a function of (seed, name, full shape) --------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_stage_init_equals_full_model(tie):
    cfg = small(tie_embeddings=tie)
    full = dict(built(cfg).named_parameters())
    stages = [
        built(cfg, block_ids=range(1, 3), has_embedding=False, has_head=False),
        built(cfg, block_ids=range(0, 1), has_head=False),
        built(cfg, block_ids=range(2, 3), has_embedding=False),
    ]
    # Canonical names: a stage holds exactly the full model's parameters of its blocks, under their names.
    assert {n for n, _ in stages[0].named_parameters()} == {
        n for n in full if n.startswith(("blocks.1.", "blocks.2."))
    }
    for stage in stages:
        for name, p in stage.named_parameters():
            # A tied head alone on a stage is the embedding under another name.
            canonical = "embed.weight" if tie and name == "head.weight" else name
            assert canonical in full, name
            assert torch.equal(p, full[canonical]), name


def test_tied_head_stage_starts_from_the_embedding():
    cfg = small(tie_embeddings=True)
    full = built(cfg)
    last = built(cfg, block_ids=range(2, 3), has_embedding=False)
    assert torch.equal(last.head.weight, full.embed.weight)


def test_init_depends_on_seed_and_name():
    cfg = small()
    a, b = dict(built(cfg, seed=1).named_parameters()), dict(built(cfg, seed=2).named_parameters())
    for name in a:
        if name.endswith("norm.weight"):
            assert torch.equal(a[name], torch.ones_like(a[name])) and torch.equal(a[name], b[name])
        else:
            assert not torch.equal(a[name], b[name]), name
    # Same shape, different names: different values.
    assert not torch.equal(a["blocks.0.attn.wq.weight"], a["blocks.1.attn.wq.weight"])
    assert not torch.equal(a["blocks.0.attn.wq.weight"], a["blocks.0.attn.wo.weight"])


def test_init_scales():
    cfg = small(d_model=64, vocab_size=128, n_layers=2, init_std=0.05)
    model = dict(built(cfg).named_parameters())
    for name, p in model.items():
        if name.endswith("norm.weight"):
            continue
        std = 0.05 / (2 * cfg.n_layers) ** 0.5 if name.endswith(("attn.wo.weight", "mlp.w2.weight")) else 0.05
        assert abs(float(p.detach().std()) / std - 1) < 0.1, name
        assert abs(float(p.detach().mean())) < 0.1 * std, name


def test_init_value_is_pure():
    cfg = small()
    shape = (48, 32)
    torch.manual_seed(0)
    first = init_value("blocks.2.mlp.w1.weight", shape, 7, cfg)
    torch.manual_seed(99)
    torch.randn(1000)  # the global RNG state plays no part
    assert torch.equal(init_value("blocks.2.mlp.w1.weight", shape, 7, cfg), first)
    assert not torch.equal(init_value("blocks.2.mlp.w1.weight", shape, 8, cfg), first)
    assert not torch.equal(init_value("blocks.2.mlp.w3.weight", shape, 7, cfg), first)
    assert init_value("blocks.2.mlp.w1.weight", shape, 7, dataclasses.replace(cfg, init_std=0.04)).equal(
        2 * first
    )


def test_init_independent_of_build_and_init_order():
    cfg = small()
    # Order 1: full model first, then a stage, with the global RNG disturbed in between.
    torch.manual_seed(5)
    full = built(cfg)
    torch.randn(123)
    stage = built(cfg, block_ids=range(1, 3), has_embedding=False, has_head=False)
    # Order 2: the stage first, then the full model, parameters filled in reverse order by hand.
    torch.manual_seed(6)
    stage2 = Transformer(cfg, block_ids=range(1, 3), has_embedding=False, has_head=False)
    full2 = Transformer(cfg)
    with torch.no_grad():
        for model in (stage2, full2):
            for name, p in reversed(list(model.named_parameters())):
                p.copy_(init_value(name, tuple(p.shape), SEED, cfg))
    init_weights(stage2, SEED)  # twice is the same as once
    for a, b in ((full, full2), (stage, stage2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name


class TinySharded(nn.Module):
    """Column- and row-split shards of block 0's attention, named as in the full model."""

    def __init__(self, cfg: ModelConfig, shard_index: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.blocks = nn.ModuleDict({"0": nn.Module()})
        attn = nn.Module()
        self.blocks["0"].attn = attn
        attn.wq = nn.Linear(d, d // 2, bias=False)  # half the output rows
        attn.wo = nn.Linear(d // 2, d, bias=False)  # half the input columns
        set_sharding(
            attn.wq.weight, Sharding(full_shape=(d, d), split_dim=0, num_shards=2, shard_index=shard_index)
        )
        set_sharding(
            attn.wo.weight, Sharding(full_shape=(d, d), split_dim=1, num_shards=2, shard_index=shard_index)
        )


def test_sharded_parameter_gets_its_chunk_of_the_canonical_value():
    cfg = small()
    full = built(cfg)
    d = cfg.d_model
    shards = [TinySharded(cfg, i) for i in range(2)]
    for s in shards:
        init_weights(s, SEED)
    wq = full.blocks["0"].attn.wq.weight
    wo = full.blocks["0"].attn.wo.weight
    assert torch.equal(shards[0].blocks["0"].attn.wq.weight, wq[: d // 2])
    assert torch.equal(shards[1].blocks["0"].attn.wq.weight, wq[d // 2 :])
    assert torch.equal(shards[0].blocks["0"].attn.wo.weight, wo[:, : d // 2])
    assert torch.equal(shards[1].blocks["0"].attn.wo.weight, wo[:, d // 2 :])
    # Directly: take() of the canonical value.
    canonical = init_value("blocks.0.attn.wq.weight", (d, d), SEED, cfg)
    s = Sharding(full_shape=(d, d), split_dim=0, num_shards=4, shard_index=3)
    assert torch.equal(s.take(canonical), canonical[3 * d // 4 :])
    assert Sharding(full_shape=(d, d)).take(canonical) is canonical


# --- attention: causality and rotary embeddings ----------------------------------------------------------


@pytest.mark.parametrize("t", [1, 6, 11])
def test_causal(t):
    cfg = small()
    model = built(cfg)
    x = tokens(cfg, 2, 12)
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    a, b = model(x), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])  # bitwise: masked scores are exactly zero after softmax
    assert not torch.allclose(a[:, t], b[:, t])  # and the change is seen from t on


def test_rotary_preserves_norms_and_matches_complex_rotation():
    head_dim, seq = 16, 24
    cos, sin = rotary_tables(head_dim, seq, 10000.0)
    assert cos.shape == sin.shape == (seq, head_dim // 2)
    x = torch.randn(2, 3, seq, head_dim, generator=torch.Generator().manual_seed(0))
    out = apply_rotary(x, cos, sin)
    assert out.shape == x.shape
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # position 0 is the identity
    assert not torch.allclose(out[:, :, 1:], x[:, :, 1:])
    # Pair (x_i, x_{i + d/2}) is the complex number x_i + i*x_{i+d/2}, rotated by pos * theta^(-2i/d).
    x64 = x.double()
    z = torch.complex(x64[..., : head_dim // 2], x64[..., head_dim // 2 :])
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat((rotated.real, rotated.imag), dim=-1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, seq = 16, 64
    cos, sin = rotary_tables(head_dim, seq, 10000.0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    for m, n in [(0, 0), (5, 2), (3, 9), (17, 1)]:
        for c in (1, 7, 30):
            torch.testing.assert_close(score(m + c, n + c), score(m, n), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), rtol=1e-3)  # the offset itself does matter


# --- activation checkpointing and pipeline stages --------------------------------------------------------


def loss_and_grads(model: nn.Module, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_changes_nothing():
    cfg = small(tie_embeddings=True)
    plain = built(cfg)
    ckpt = built(cfg, activation_checkpointing=True)
    plain.train(), ckpt.train()
    x, y = tokens(cfg, 2, 16, seed=4), tokens(cfg, 2, 16, seed=5)
    loss_a, grads_a = loss_and_grads(plain, x, y)
    loss_b, grads_b = loss_and_grads(ckpt, x, y)
    # Bitwise: the recomputed forward is the same arithmetic as the original one.
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert all(g.abs().sum() > 0 for g in grads_a.values())


@pytest.mark.parametrize("k", [1, 2])
def test_two_stages_compose_to_the_full_model(k):
    cfg = small()
    full = built(cfg)
    a = built(cfg, block_ids=range(0, k), has_head=False)
    b = built(cfg, block_ids=range(k, cfg.n_layers), has_embedding=False)
    x, y = tokens(cfg, seed=6), tokens(cfg, seed=7)
    loss_full, grads_full = loss_and_grads(full, x, y)

    h = a(x)
    h_in = h.detach().requires_grad_(True)
    loss = b(h_in, y)
    loss.backward()
    h.backward(h_in.grad)  # the pipeline's send/recv of activations and their gradients
    assert torch.equal(loss.detach(), loss_full)
    for stage in (a, b):
        for name, p in stage.named_parameters():
            assert torch.equal(p.grad, grads_full[name]), name
    assert len(dict(a.named_parameters())) + len(dict(b.named_parameters())) == len(grads_full)


def test_tied_stages_compose_with_the_same_weights():
    """With tied embeddings each end holds its own copy; given the full model's weights (the head copy set
    from the embedding) the two stages reproduce its loss exactly."""
    cfg = small(tie_embeddings=True)
    full = built(cfg)
    a = Transformer(cfg, block_ids=range(0, 2), has_head=False)
    b = Transformer(cfg, block_ids=range(2, 3), has_embedding=False)
    state = full.state_dict()
    for stage in (a, b):
        stage.load_state_dict({n: v for n, v in state.items() if n in stage.state_dict()}, strict=True)
    assert torch.equal(b.head.weight, full.embed.weight)
    x, y = tokens(cfg, seed=8), tokens(cfg, seed=9)
    assert torch.equal(b(a(x), y), full(x, y))


# --- FLOPs --------------------------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
    # Per block: wq 32*32 + wk 32*16 + wv 32*16 + wo 32*32 = 3072; MLP 3*32*96 = 9216; two norms 64.
    block = 3072 + 9216 + 64
    n = 2 * block + 32 + 64 * 32  # blocks + final norm + output head (vocab * d)
    assert n == 26784
    expected = 6 * n + 12 * 2 * 4 * 8 * 16  # 12 * L * H * Q * T with Q = 32 / 4, T = 16
    assert flops_per_token(cfg, 16) == expected == 172992
    # The head multiplies even when tied; the sequence term grows linearly in T.
    assert flops_per_token(dataclasses.replace(cfg, tie_embeddings=True), 16) == expected
    assert flops_per_token(cfg, 32) - flops_per_token(cfg, 16) == 12 * 2 * 4 * 8 * 16
    # N is what the model holds apart from the input embedding.
    model = Transformer(cfg)
    assert n == sum(p.numel() for name, p in model.named_parameters() if name != "embed.weight")

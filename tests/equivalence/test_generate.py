"""Generation: the KV-cached model against its own full forward (fp32 and float64), greedy decoding from
Hugging Face folders against transformers' generate, token for token, alone and in a left-padded batch,
the sampling rules (top-k, top-p, temperature, seeds) on hand-made distributions, and 16-bit decoding
against the same 16-bit model without its cache."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dtrain.config import ModelConfig, RopeScalingConfig
from dtrain.generate import generate, next_token_probs, pick, resolve, top_k_keep, top_p_keep
from dtrain.kv_cache import KVCache
from dtrain.model import Transformer, init_weights
from parallel.precision import DTYPES
from tests import hf_models
from tests.reference import float64
from tests.tolerances import FP32, FP64, LOW_PRECISION_NOISE_FACTOR

VARIANTS = {
    # grouped-query heads, qk-norm, q/k/v biases, explicit head_dim and Llama 3.1 rope scaling at once
    "gqa-qknorm-bias-llama3": {
        "n_kv_heads": 2,
        "qk_norm": True,
        "qkv_bias": True,
        "head_dim": 16,
        "rope_scaling": RopeScalingConfig(type="llama3", original_max_seq_len=8),
    },
    "mha-tied": {"n_kv_heads": None, "tie_embeddings": True},
}


def model_of(variant: str) -> Transformer:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=40, **VARIANTS[variant])
    model = Transformer(cfg).eval()
    init_weights(model, 7)
    with torch.no_grad():  # biases and gains start at zero and one: make them matter
        for name, p in model.named_parameters():
            if name.endswith((".bias", "norm.weight")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


def assert_close_in_norm(ours: torch.Tensor, ref: torch.Tensor, tol: dict) -> None:
    """Per tensor in the 2-norm, as the layout tests compare parameters: a logit near zero carries the
    rounding of its large neighbours, which an elementwise relative bound would misread."""
    error = float((ours - ref).norm() / ref.norm())
    assert error <= tol["rtol"], f"relative error {error:.3g} > {tol['rtol']}"


def cached_logits(model: Transformer, tokens: torch.Tensor, valid: torch.Tensor, cuts: list[int]):
    """Logits of `tokens` fed through a cache in pieces: prefill up to cuts[0], then each next piece."""
    cache, out, start = KVCache(tokens.shape[1]), [], 0
    for end in [*cuts, tokens.shape[1]]:
        out.append(model(tokens[:, start:end], cache=cache.feed(valid[:, start:end])))
        start = end
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_the_full_forward(variant, precision):
    with float64() if precision == "fp64" else contextlib.nullcontext(), torch.no_grad():
        model = model_of(variant)
        tokens = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))
        full = model(tokens)
        # a prefill, a piece of several tokens, then one token per call
        cuts = [7, 10, *range(11, 24)]
        cached = cached_logits(model, tokens, torch.ones_like(tokens, dtype=torch.bool), cuts)
    assert_close_in_norm(cached, full, FP64 if precision == "fp64" else FP32)


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_left_padding_is_invisible(precision):
    """Each row of a left-padded batch gets the logits it gets alone: positions start at its first real
    token and padding is never attended."""
    with float64() if precision == "fp64" else contextlib.nullcontext(), torch.no_grad():
        model = model_of("gqa-qknorm-bias-llama3")
        lengths, width = [16, 5, 11], 16
        tokens = torch.randint(0, 64, (3, width), generator=torch.Generator().manual_seed(2))
        valid = torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
        # the prompt part padded, then six real tokens per row one at a time
        more = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(3))
        sequence = torch.cat([tokens, more], dim=1)
        mask = torch.cat([valid, torch.ones_like(more, dtype=torch.bool)], dim=1)
        cached = cached_logits(model, sequence, mask, list(range(width, width + 6)))
        for row, n in enumerate(lengths):
            alone = model(sequence[row : row + 1, width - n :])[0]
            assert_close_in_norm(cached[row, width - n :], alone, FP64 if precision == "fp64" else FP32)


def test_the_cache_refuses_positions_beyond_max_seq_len():
    model = model_of("mha-tied")
    tokens = torch.zeros(1, 41, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=40"), torch.no_grad():
        model(tokens, cache=KVCache(41).feed(torch.ones_like(tokens, dtype=torch.bool)))


def test_generation_ends_at_eos_and_at_max_seq_len():
    model = model_of("mha-tied")
    first = generate(model, [[1, 2, 3]], 5)
    assert len(first[0]) == 5
    eos = first[0][2]
    assert generate(model, [[1, 2, 3]], 5, eos_ids=frozenset([eos])) == [first[0][: first[0].index(eos) + 1]]
    # a prompt two short of max_seq_len=40 gets two tokens whatever max_new_tokens says
    assert [len(o) for o in generate(model, [[1] * 38, [1, 2]], 5)] == [2, 5]


# --- greedy against transformers ------------------------------------------------------------------------

PROMPTS = [[5, 17, 33, 8, 90, 41, 3, 60, 12], [12, 60], [7, 7, 1, 44, 23]]
NEW = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf-gen")
    return {f: hf_models.make(str(root / f), f, noise=0.2) for f in hf_models.FAMILIES}


def transformers_greedy(model, prompts: list[list[int]], eos: frozenset[int]) -> list[list[int]]:
    """transformers' generate(do_sample=False) on the left-padded batch, each row cut after its eos."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


# Between them the first three have every option (GQA, tied and untied heads, rope scaling, biases,
# qk-norm, head_dim); the other two run with the slow tests.
FAST_FAMILIES = ["llama-tied-llama3-rope", "qwen2-biases-tied", "qwen3-qk-norm-head-dim"]


@pytest.mark.parametrize(
    "family",
    [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in hf_models.FAMILIES],
)
def test_greedy_equals_transformers_alone_and_in_a_left_padded_batch(folders, family):
    import transformers

    source = resolve(folders[family])
    model = source.build(torch.device("cpu"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folders[family]).eval()
    batch = generate(model, PROMPTS, NEW, source.eos_ids, temperature=0)
    assert batch == transformers_greedy(reference, PROMPTS, source.eos_ids)
    # the shortest prompt, the most padded row of the batch, alone
    alone = generate(model, [PROMPTS[1]], NEW, source.eos_ids, temperature=0)
    assert alone == transformers_greedy(reference, [PROMPTS[1]], source.eos_ids) == [batch[1]]
    assert len(set(batch[0])) > 3  # a varied continuation, not one token repeated


# --- sampling ------------------------------------------------------------------------------------------


def test_top_k_one_is_greedy_and_a_seed_reproduces_its_draws():
    model = model_of("gqa-qknorm-bias-llama3")
    prompts = [[3, 9, 27], [40, 1]]
    greedy = generate(model, prompts, 12, temperature=0)
    assert generate(model, prompts, 12, temperature=1.5, top_k=1, seed=5) == greedy
    drawn = generate(model, prompts, 12, temperature=1.0, seed=11)
    assert generate(model, prompts, 12, temperature=1.0, seed=11) == drawn
    assert generate(model, prompts, 12, temperature=1.0, seed=12) != drawn
    assert drawn != greedy


def test_temperature_divides_the_logits():
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]], dtype=torch.float64)
    for t in (0.25, 1.0, 3.0):
        torch.testing.assert_close(next_token_probs(z, t, 0, 1.0), torch.softmax(z / t, dim=-1), **FP64)


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    probs = torch.tensor([[0.125, 0.5, 0.0625, 0.25, 0.0625]], dtype=torch.float64)  # sorted: 1, 3, 0, 2|4
    kept = lambda p: top_p_keep(probs, p)[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.5) == [1]  # the first token alone reaches 0.5
    assert kept(0.5000001) == [1, 3]
    assert kept(0.75) == [1, 3]
    assert kept(0.8) == [0, 1, 3]
    assert kept(0.875) == [0, 1, 3]
    assert kept(0.9) == [0, 1, 2, 3]  # of the tied 0.0625s the lower id comes first
    assert kept(1.0) == [0, 1, 2, 3, 4]
    assert kept(1e-9) == [1]
    ties = torch.full((2, 4), 0.25, dtype=torch.float64)
    assert top_p_keep(ties, 0.5).sum(dim=-1).tolist() == [2, 2]  # exactly two of four equal tokens
    assert top_p_keep(ties, 0.5)[0].tolist() == [True, True, False, False]
    assert top_p_keep(ties, 1.0).all()


def test_top_k_keeps_exactly_k_tokens():
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]])
    assert top_k_keep(probs, 2)[0].tolist() == [False, True, True, False, False]
    assert top_k_keep(probs, 4)[0].tolist() == [True, True, True, True, False]  # ties: the lower id
    assert top_k_keep(probs, 0).all() and top_k_keep(probs, 9).all()
    restricted = next_token_probs(torch.log(probs), 1.0, 3, 1.0)[0]
    torch.testing.assert_close(restricted, torch.tensor([0.0, 0.375, 0.375, 0.25, 0.0]))


def test_draws_come_only_from_the_kept_tokens():
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.0625, 0.25, 0.0625]])).repeat(2000, 1)
    drawn = pick(logits, 1.0, 0, 0.75, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0
    n, p = 2000, 0.5 / 0.75  # renormalised over the kept tokens
    assert abs(counts[1] - n * p) < 5 * math.sqrt(n * p * (1 - p))  # five standard deviations


def uncached_greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding without a cache: the whole sequence through the model again for every token; the
    new ids and each step's logits (n, vocab)."""
    ids, steps = list(prompt), []
    for _ in range(n):
        steps.append(model(torch.tensor([ids]))[0, -1])
        ids.append(int(steps[-1].argmax()))
    return ids[len(prompt) :], torch.stack(steps)


def forced_cached_logits(model: Transformer, prompts: list[list[int]], new: list[list[int]]) -> torch.Tensor:
    """The cached model's logits for every step of `new` (rows, steps, vocab): the left-padded batch
    prefilled, then fed the given ids one at a time whatever it would pick (cached_logits)."""
    width, steps = max(map(len, prompts)), len(new[0])
    tokens = torch.tensor([[0] * (width - len(p)) + p + n for p, n in zip(prompts, new, strict=True)])
    valid = torch.arange(width + steps)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    logits = cached_logits(model, tokens, valid, list(range(width, width + steps)))
    return logits[:, width - 1 : width - 1 + steps]


@pytest.mark.parametrize(
    "family, precision",
    [
        ("llama-tied-llama3-rope", "bf16"),
        pytest.param("qwen3-qk-norm-head-dim", "fp16", marks=pytest.mark.slow),
    ],
)
def test_16_bit_cached_decoding_equals_the_uncached_model_in_the_same_dtype(folders, family, precision):
    """The GPU path's precision, on the CPU: parameters stored in 16 bits (no autocast), keys and values
    cached in them. Fed the uncached model's greedy tokens, the cache gives its logits at every step within
    LOW_PRECISION_NOISE_FACTOR times the model's own drift between two blockings of the same causal sums
    (alone and in a left-padded batch); greedy decoding picks its tokens up to the first step whose two
    best logits are closer than that, where either pick is the same model's."""
    model = resolve(folders[family]).build(torch.device("cpu"), precision)
    dtype = DTYPES[precision]
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        expected, full = zip(*(uncached_greedy(model, prompt, NEW) for prompt in PROMPTS), strict=True)
        alone = [forced_cached_logits(model, [p], [e])[0] for p, e in zip(PROMPTS, expected, strict=True)]
        batch = forced_cached_logits(model, PROMPTS, list(expected))
        # The same model's logits with the whole continuation in one forward: causal, so equal to the
        # stepwise ones in exact arithmetic; what differs is 16-bit rounding under other matmul shapes.
        whole = [
            model(torch.tensor([p + e]))[0, len(p) - 1 : len(p) - 1 + NEW]
            for p, e in zip(PROMPTS, expected, strict=True)
        ]
    decided = []
    for row, ref in enumerate(r.float() for r in full):
        unit = torch.finfo(dtype).eps * ref.abs().max()  # eps times the largest |logit| of the prompt's steps
        drift = (whole[row].float() - ref).abs().max()
        bound = LOW_PRECISION_NOISE_FACTOR * torch.maximum(drift, unit)
        for cached in (alone[row], batch[row]):
            assert (cached.float() - ref).abs().max() <= bound, (row, precision)
        margins = ref.topk(2, dim=-1).values.diff(dim=-1).abs().flatten()
        near_tie = (margins <= bound).nonzero().flatten().tolist()
        decided.append(near_tie[0] if near_tie else NEW)  # the steps before the first near-tie
    picked = [generate(model, [prompt], NEW, temperature=0)[0] for prompt in PROMPTS]
    for got in (picked, generate(model, PROMPTS, NEW, temperature=0)):
        assert [g[:d] for g, d in zip(got, decided, strict=True)] == [
            e[:d] for e, d in zip(expected, decided, strict=True)
        ]
    # Something is compared: a varied continuation, and a prompt whose first six tokens are no tie.
    assert max(decided) >= 6 and len(set(expected[0])) > 3
    drawn = generate(model, PROMPTS, 6, temperature=0.8, top_p=0.9, seed=1)  # logits widened to sample
    assert [len(o) for o in drawn] == [6, 6, 6]

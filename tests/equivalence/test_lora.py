"""LoRA fine-tuning and frozen parameters against code none of us wrote.

One process: a step of dtrain's LoRA model from a Hugging Face folder gives the loss and adapter
gradients of peft's LoRA on transformers' model of the same folder (FP32). Layouts: data, tensor
(+ sequence), pipeline parallelism and ZeRO 1-3 with offload, accumulation and activation checkpointing
train the adapters as torch DDP does over the single-process model with the same frozen base (float64 to
FP64, fp32 to FP32, tests/reference.py); the base weights come out bitwise unchanged, and every rank's
held bytes equal `dtrain estimate`'s figures from the config alone.
"""

from __future__ import annotations

import pytest
import torch

from dtrain.analysis.estimate import estimate_model_states
from dtrain.config import load_config
from dtrain.hf import HFWeights
from dtrain.model import Transformer, init_weights
from tests import hf_models
from tests.reference import TINY, TINY_MODEL, assert_held_bytes_are_estimated, layout_matches_ddp
from tests.tolerances import FP32

FAMILY = "mistral"  # grouped-query attention: 4 query heads, 2 key/value heads
ADAPTERS = ("model.lora.rank=4", "model.lora.alpha=8")
VOCAB = hf_models.COMMON["vocab_size"]
ALL_TARGETS = "model.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return hf_models.make(str(tmp_path_factory.mktemp("hf") / FAMILY), FAMILY)


def dtrain_lora(folder: str, *overrides: str) -> Transformer:
    cfg = load_config(None, [f"model.init_from={folder}", *ADAPTERS, *overrides])
    model = Transformer(cfg.model)
    weights = HFWeights(folder)
    init_weights(model, cfg.train.seed, weights.read)
    weights.close()
    return model


def test_fresh_adapters_change_nothing(folder):
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = dtrain_lora(folder, "model.lora.rank=0").eval()
    adapted = dtrain_lora(folder, ALL_TARGETS).eval()
    assert torch.equal(plain(tokens), adapted(tokens))
    assert all(p.requires_grad == ("lora_" in n) for n, p in adapted.named_parameters())


def test_lora_step_equals_peft_on_transformers(folder):
    """Same adapter values in both (A as dtrain initialises it, B nonzero so every gradient is), same
    tokens: the token-loss sum and the gradient of every adapter agree to FP32; the base gets none."""
    import peft
    import transformers

    ours = dtrain_lora(folder, ALL_TARGETS, "model.lora.dropout=0.0").train()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    theirs = peft.get_peft_model(hf, config).train()
    from dtrain.lora import peft_name

    theirs_params = dict(theirs.named_parameters())

    def theirs_of(name: str) -> torch.nn.Parameter:
        return theirs_params[peft_name(name).replace(".weight", ".default.weight")]

    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                theirs_of(name).copy_(p)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = ours(x, y)
    loss.backward()
    logits = theirs(input_ids=x).logits
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference, **FP32)
    adapters = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(adapters) == 2 * 7 * hf_models.COMMON["num_hidden_layers"]
    for name, p in adapters:  # per tensor in the 2-norm, as parameters are (tests/tolerances.py)
        want = theirs_of(name).grad
        err = float((p.grad - want).norm() / want.norm())
        assert err <= FP32["rtol"], f"{name}: relative 2-norm difference {err:.2e}"
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


# (world, parallel.* layout, training overrides): every GradSync, every tensor split of an adapter.
LAYOUTS = {
    "tp2-sp-zero3-offload-all": (
        2,
        ("parallel.tp=2", "parallel.sp=true", "parallel.zero=3", "parallel.offload=all"),
        (ALL_TARGETS,),
    ),
    "pp2-zero1-offload-accumulation": (
        2,
        ("parallel.pp=2", "parallel.zero=1", "parallel.offload=optimizer"),
        ("train.micro_batch_size=2",),
    ),
    "dp2-zero3-checkpointing-accumulation": (
        2,
        ("parallel.zero=3",),
        ("train.activation_checkpointing=true", "train.micro_batch_size=2", ALL_TARGETS),
    ),
}
SLOW_LAYOUTS = {
    "dp2-ddp": (2, (), ()),
    "cp2-zero1": (2, ("parallel.cp=2", "parallel.zero=1"), (ALL_TARGETS,)),
    "dp4-zero2-shard2": (4, ("parallel.zero=2", "parallel.dp_shard=2"), ()),
    "tp2-ddp-row-and-column": (2, ("parallel.tp=2",), (ALL_TARGETS,)),
    "dp2-zero2-offload": (2, ("parallel.zero=2", "parallel.offload=optimizer"), (ALL_TARGETS,)),
    "tp4-replicated-kv-zero1": (4, ("parallel.tp=4", "parallel.zero=1"), (ALL_TARGETS,)),
    "tp2-pp2-sp-zero2": (4, ("parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.zero=2"), ()),
    "pp2-dp2-zero3-interleaved": (
        4,
        (
            "parallel.pp=2",
            "parallel.zero=3",
            "parallel.pp_schedule=interleaved",
            "parallel.pp_virtual_stages=2",
        ),
        ("train.micro_batch_size=2",),
    ),
    "dp2-freeze-embeddings-zero3": (
        2,
        ("parallel.zero=3",),
        ("model.lora.rank=0", "train.freeze=[embed.weight,blocks.0.*,'*norm.weight']"),
    ),
}


def lora_case(layout: tuple[str, ...], overrides: tuple[str, ...]) -> dict:
    result = layout_matches_ddp(layout, overrides)
    return {k: result[k] for k in ("losses", "held_bytes", "pp_rank")}


def _run(request, folder, world, layout, overrides):
    overrides = (f"model.init_from={folder}", *ADAPTERS, *overrides)
    results = request.getfixturevalue(f"world{world}").run(lora_case, layout, overrides)
    assert results[0]["losses"][-1] < results[0]["losses"][0]  # it learned
    base = [o for o in TINY if o not in TINY_MODEL]
    assert_held_bytes_are_estimated(results, [*base, *layout, *overrides], world)


@pytest.mark.parametrize("name", LAYOUTS)
def test_lora_layouts_match_torch_ddp(request, folder, name):
    _run(request, folder, *LAYOUTS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_LAYOUTS)
def test_more_lora_layouts_match_torch_ddp(request, folder, name):
    _run(request, folder, *SLOW_LAYOUTS[name])


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [("parallel.zero=3",), ("parallel.pp=2", "parallel.zero=3")], ids=["dp2", "pp2"]
)
def test_lora_with_tied_embeddings_under_zero3(request, tmp_path_factory, layout):
    """A frozen embedding that is also the head: its ZeRO-3 unit is gathered for the head's backward."""
    tied = hf_models.make(str(tmp_path_factory.mktemp("hf") / "tied"), "llama-tied-llama3-rope")
    _run(request, tied, 2, layout, ("train.micro_batch_size=2",))


def test_lora_dropout_acts_on_the_adapter_input_only():
    from parallel.lora import LoRALinear

    base = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(base, rank=2, alpha=4.0, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + 2.0 * layer.lora_B(layer.lora_A(dropped))
    assert torch.equal(y, expected)
    assert torch.equal(layer.eval()(x), base(x) + 2.0 * layer.lora_B(layer.lora_A(x)))


def test_frozen_parameters_hold_no_gradient_or_optimizer_state(folder):
    """dtrain estimate on meta: a LoRA run's gradients and AdamW state are the adapters' only."""
    base = [o for o in TINY if o not in TINY_MODEL]
    for zero in (0, 1, 2, 3):
        cfg = load_config(None, [*base, f"model.init_from={folder}", *ADAPTERS, f"parallel.zero={zero}"])
        est = estimate_model_states(cfg, 1, communication=False)
        adapters = est["params"]
        layers, d, r = hf_models.COMMON["num_hidden_layers"], hf_models.COMMON["hidden_size"], 4
        assert adapters == layers * (r * d + d * r + r * d + 2 * 12 * r)  # q: 48 -> 48, v: 48 -> 2 * 12
        with torch.device("meta"):
            whole = sum(p.numel() for p in Transformer(cfg.model).parameters())
        assert est["device"] == {"params": 4 * whole, "grads": 4 * adapters, "optimizer": 8 * adapters}


MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.0", "model.n_layers=2")
EXPERT_LAYOUTS = {
    "ep2-zero3": ("parallel.ep=2", "parallel.zero=3"),
    "ep2-zero1": ("parallel.ep=2", "parallel.zero=1"),
}


@pytest.mark.parametrize("layout", EXPERT_LAYOUTS.values(), ids=EXPERT_LAYOUTS.keys())
def test_lora_on_attention_of_a_mixture_of_experts_model(world2, layout):
    """Adapters on attention, every expert frozen: the expert wrapper holds no trained state."""
    overrides = (*MOE, "model.lora.rank=4", "model.lora.targets=[wq,wk,wv,wo]")
    results = world2.run(lora_case, layout, overrides)
    assert_held_bytes_are_estimated(results, [*TINY, *layout, *overrides], 2)


# fp16 with dynamic loss scaling and bf16 (the tiny random model, adapters on every projection): the
# scaled adapter gradients, unscaled on the trained shards only, train as torch DDP with GradScaler does.
PRECISIONS = {
    "fp16-zero2": ("train.precision=fp16", "parallel.zero=2"),
    "bf16-ddp": ("train.precision=bf16",),
}


@pytest.mark.parametrize("overrides", PRECISIONS.values(), ids=PRECISIONS.keys())
def test_lora_in_16_bits_matches_torch_ddp(world2, overrides):
    from tests.equivalence.test_data_parallel import equivalence_case

    overrides = ("model.lora.rank=4", ALL_TARGETS, "train.steps=8", "train.lr=3e-2", *overrides)
    losses = world2.run(equivalence_case, overrides)[0]
    assert losses[-1] < losses[0]

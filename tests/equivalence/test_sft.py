"""Supervised fine-tuning data against the references: the step-0 loss of a run from a Hugging Face
model equals transformers' mean per-token loss with labels -100 on the prompts, and layouts trained on
packed prompt/response documents (document masks, per-document positions, targets only on responses)
equal torch DDP as every layout does on token streams (tests/reference.py, layout_matches_ddp).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dtrain.prepare import prepare_data
from tests import hf_models
from tests.reference import layout_matches_ddp, tiny_config
from tests.tolerances import FP32


def _records(n: int) -> list[dict]:
    return [
        {
            "prompt": hf_models.sample_text(2 + i % 5, i),
            "response": hf_models.sample_text(1 + (i * 3) % 7, 99 + i),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A random llama folder with a tokenizer, and 8 prompt/response records prepared with it."""
    root = tmp_path_factory.mktemp("sft")
    model = hf_models.make(str(root / "model"), "llama-mha-untied")
    tok = hf_models.make_tokenizer(str(root / "tok"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "tok" / name, root / "model" / name)
    records = _records(8)
    (root / "pr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_data(str(root / "pr.jsonl"), str(root / "data"), "prompt-response", model, val_fraction=0.0)
    return {"model": model, "tok": tok, "data": str(root / "data"), "records": records, "root": root}


def _step0_loss(overrides: tuple[str, ...]) -> tuple[float, int]:
    from dtrain.trainer import Trainer
    from tests import harness

    cfg = tiny_config(2, *overrides)
    result = Trainer(cfg, harness.grid(dp=2), torch.device("cpu")).train_step()
    return result.loss, result.loss_tokens


def test_step0_loss_equals_transformers_with_prompt_labels_masked(world2, sft):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(sft["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(sft["model"]).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in sft["records"]:
            prompt = tok(r["prompt"], add_special_tokens=True)["input_ids"]
            ids = prompt + tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            labels = torch.tensor([-100] * len(prompt) + ids[len(prompt) :])
            logits = model(torch.tensor([ids])).logits[0]
            # transformers' causal-LM loss shifts labels by one: position t predicts label t + 1.
            losses = torch.nn.functional.cross_entropy(
                logits[:-1], labels[1:], reduction="none", ignore_index=-100
            )
            total += float(losses.sum())
            count += int((labels[1:] != -100).sum())
    overrides = (
        f"model.init_from={sft['model']}", "data.kind=memmap", f"data.path={sft['data']}",
        "data.packing=false", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
    )  # fmt: skip
    ours, tokens = world2.run(_step0_loss, overrides)[0]
    assert tokens == count
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(total / count), **FP32)


MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.aux_loss_coef=0.1")
PACKED_MODEL = ("train.global_batch_size=16", "train.micro_batch_size=2", "train.steps=3", "model.n_layers=4")
# A representative slice on 2 ranks: data parallelism with accumulation and ZeRO 1-3, tensor with sequence
# parallelism, both pipeline schedules, checkpointing; compositions on 4 ranks with -m slow.
LAYOUTS = {
    "dp2-zero1-accumulation": (2, ("parallel.zero=1",)),
    "dp2-zero2": (2, ("parallel.zero=2",)),
    "dp2-zero3": (2, ("parallel.zero=3",)),
    "tp2-sp": (2, ("parallel.tp=2", "parallel.sp=true")),
    "pp2-1f1b-checkpointing": (
        2,
        ("parallel.pp=2", "parallel.pp_schedule=1f1b", "train.activation_checkpointing=true"),
    ),
    "pp2-interleaved": (
        2,
        ("parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2"),
    ),
    # MoE: each micro-batch's auxiliary losses weigh its share of the target tokens, also when a 1F1B
    # backward recomputes the forward under checkpointing after other micro-batches' forwards.
    "pp2-1f1b-checkpointing-moe": (
        2,
        ("parallel.pp=2", "parallel.pp_schedule=1f1b", "train.activation_checkpointing=true", *MOE),
    ),
    # Documents that span context chunks: ring attention masks them from the ids travelling with keys.
    "cp2": (2, ("parallel.cp=2",)),
}
SLOW_LAYOUTS = {
    "dp2-ep2-moe-zero1": (2, ("parallel.ep=2", "parallel.zero=1", *MOE)),
    "tp2sp-pp2-zero1": (4, ("parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "parallel.zero=1")),
    "dp2-pp2-zero3-tied": (4, ("parallel.pp=2", "parallel.zero=3", "model.tie_embeddings=true")),
    "cp2-tp2sp-checkpointing": (
        4,
        ("parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "train.activation_checkpointing=true"),
    ),
    "cp2-pp2-zero2": (4, ("parallel.cp=2", "parallel.pp=2", "parallel.zero=2")),
}


@pytest.fixture(scope="module")
def packed_sft(tmp_path_factory):
    """40 prompt/response documents with the test tokenizer, for rows of 17 tokens: many share a row,
    the long ones are cut into pieces."""
    root = tmp_path_factory.mktemp("packed")
    tok = hf_models.make_tokenizer(str(root / "tok"))
    (root / "pr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(40)))
    prepare_data(str(root / "pr.jsonl"), str(root / "data"), "prompt-response", tok, val_fraction=0.0)
    return ("data.kind=memmap", f"data.path={root / 'data'}", "data.packing=true", *PACKED_MODEL)


def _case(request, packed_sft, world: int, layout: tuple[str, ...]) -> None:
    results = request.getfixturevalue(f"world{world}").run(layout_matches_ddp, layout, packed_sft)
    losses = results[0]["losses"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", LAYOUTS)
def test_packed_sft_layouts_match_torch_ddp(request, packed_sft, name):
    _case(request, packed_sft, *LAYOUTS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_LAYOUTS)
def test_packed_sft_more_layouts_match_torch_ddp(request, packed_sft, name):
    _case(request, packed_sft, *SLOW_LAYOUTS[name])

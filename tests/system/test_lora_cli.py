"""LoRA runs through the command line: a tensor-parallel LoRA fine-tuning of a Hugging Face folder, its
checkpoint (the adapters and the base they apply to), `dtrain export --format peft` loaded by peft onto
transformers' base model and `--format hf` (merged) loaded by transformers, both with dtrain's logits;
and bad LoRA input refused in one line (exit 2, nothing written)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from dtrain import checkpoint, cli, runtime
from dtrain.config import config_from_dict
from dtrain.model import Transformer
from parallel.lora import is_adapter
from tests import harness, hf_models
from tests.reference import TINY, TINY_MODEL, tiny_config
from tests.tolerances import HF_LOGITS

FAMILY = "mistral"
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[q_proj,v_proj,o_proj,down_proj]")
CONFIG = os.path.join(harness.repo_root(), "configs", "tiny.yaml")
TOKENS = torch.randint(0, hf_models.COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(4))


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    def refuse(*_):
        raise AssertionError("bad input reached process-group creation")

    monkeypatch.setattr(runtime, "init_distributed", refuse)
    for name in ("WORLD_SIZE", "RANK", "TORCHELASTIC_MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return hf_models.make(str(tmp_path_factory.mktemp("hf") / FAMILY), FAMILY)


def lora_run(out_dir: str, folder: str) -> None:
    from dtrain.trainer import Trainer

    overrides = (
        f"model.init_from={folder}",
        *LORA,
        "train.steps=3",
        "train.lr=3e-2",
        f"run.out_dir={out_dir}",
    )
    cfg = tiny_config(dist.get_world_size(), "parallel.tp=2", *overrides)
    Trainer(cfg, harness.grid(tp=2, dp=1), torch.device("cpu")).fit()


@pytest.fixture(scope="module")
def step(world2, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    world2.run(lora_run, str(out), folder)
    return out / "checkpoints" / "step_3"


def ours_logits(step) -> torch.Tensor:
    cfg = config_from_dict(checkpoint.load_state(str(step))["config"])
    model = Transformer(cfg.model).eval()
    tensors = checkpoint.model_tensors(str(step))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])
        return model(TOKENS)


def test_checkpoint_holds_the_adapters_and_names_the_base(step, folder):
    saved = checkpoint.load_parts(str(step), "model")
    assert saved and all(is_adapter(name) for name in saved)
    assert any(float(t.abs().max()) > 0 for n, t in saved.items() if n.endswith("lora_B.weight"))  # trained
    optimizer = checkpoint.load_parts(str(step), "optimizer")
    assert {k.rsplit("/", 1)[0] for k in optimizer} == set(saved)
    base = checkpoint.load_state(str(step))["base"]
    assert base == {"init_from": os.path.abspath(folder), "fingerprint": checkpoint.fingerprint(folder)}


def test_peft_export_loads_onto_the_transformers_base(step, folder, tmp_path):
    import peft
    import transformers

    out = tmp_path / "adapter"
    cli.main(["export", str(step), "--format", "peft", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = theirs(input_ids=TOKENS).logits
    torch.testing.assert_close(ours_logits(step), logits, **HF_LOGITS)
    # The adapters moved the logits: the base alone differs.
    with torch.no_grad(), theirs.disable_adapter():
        assert (theirs(input_ids=TOKENS).logits - logits).abs().max() > 100 * HF_LOGITS["atol"]


def test_merged_export_loads_in_transformers(step, tmp_path):
    import transformers

    out = tmp_path / "merged"
    cli.main(["export", str(step), "--format", "hf", "--out", str(out)])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in theirs.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(ours_logits(step), theirs(TOKENS).logits, **HF_LOGITS)


def fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1, err
    return err.strip().removeprefix("dtrain: error: ")


def train(out_dir, *overrides: str) -> list[str]:
    return ["train", CONFIG, *TINY, f"run.out_dir={out_dir}", *overrides]


BAD = {
    "negative-rank": (("model.lora.rank=-1",), "model.lora.rank=-1 must be >= 0 (0 = no adapters)"),
    "unknown-target": (
        ("model.lora.rank=4", "model.lora.targets=[qkv]"),
        "model.lora.targets: 'qkv' matches no layer; choose from wq, wk, wv, wo, w1, w2, w3, q_proj, k_proj, "
        "v_proj, o_proj, gate_proj, up_proj, down_proj",
    ),
    "experts": (
        ("model.lora.rank=4", "model.lora.targets=[wq,gate_proj]", "model.moe.num_experts=4"),
        "model.lora.targets w1 with model.moe.num_experts=4: adapters on experts are not supported; target "
        "attention projections (wq, wk, wv, wo) only",
    ),
    "freeze-matches-nothing": (
        ("train.freeze=[blocks.*.attn.qkv.weight]",),
        "train.freeze: 'blocks.*.attn.qkv.weight' matches no parameter (canonical names such as "
        "blocks.0.attn.wq.weight, embed.weight)",
    ),
}


@pytest.mark.parametrize(("overrides", "message"), BAD.values(), ids=BAD.keys())
def test_bad_lora_config(capsys, tmp_path, overrides, message):
    out = tmp_path / "run"
    assert fails(capsys, train(out, *overrides)) == message
    assert not out.exists()


def test_resume_on_another_base_is_refused(capsys, step, folder, tmp_path):
    other = hf_models.make(str(tmp_path / "other"), FAMILY, noise=0.06)  # same shapes, other weights
    capsys.readouterr()  # transformers' progress output while saving
    base = [o for o in TINY if o not in TINY_MODEL]
    config = tmp_path / "from_folder.yaml"
    config.write_text("data:\n  kind: synthetic\n")  # no model keys: the shape is config.json's
    argv = ["train", str(config), *base, f"model.init_from={other}", *LORA, f"run.resume={step}"]
    argv.append(f"run.out_dir={tmp_path / 'run'}")
    assert fails(capsys, argv) == (
        f"{step} trained adapters or unfrozen parameters on model.init_from={os.path.abspath(folder)}, here "
        f"model.init_from={os.path.abspath(other)}; resume with the base it was trained on"
    )

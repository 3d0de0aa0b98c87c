"""Hugging Face folders through the command line: continued pre-training under torchrun from a local folder,
the export back that transformers loads with dtrain's logits, the estimate from config.json alone, and
every bad folder refused in one line (exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtrain import checkpoint
from dtrain.config import ConfigError, config_from_dict, load_config
from dtrain.hf import check_init_from
from dtrain.model import Transformer
from tests import hf_models
from tests.harness import main_in_process, repo_root, run_python
from tests.tolerances import HF_LOGITS

FAMILY = "qwen2-biases-tied"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = hf_models.make(str(tmp_path_factory.mktemp("hf") / "qwen2"), FAMILY)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)  # a tokenizer file the export must carry along
    return path


def test_torchrun_trains_from_a_folder_and_exports_one_transformers_loads(folder, tmp_path):
    import transformers

    out = tmp_path / "run"
    config = os.path.join(repo_root(), "configs", "finetune.yaml")
    train = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dtrain", "train", config, f"model.init_from={folder}", "parallel.tp=2", "train.steps=3",
        "train.seq_len=32", "train.lr=1e-3", f"run.out_dir={out}",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    step = out / "checkpoints" / "step_3"
    exported = tmp_path / "exported"
    result = run_python("-m", "dtrain", "export", str(step), "--format", "hf", "--out", str(exported))
    assert result.returncode == 0, result.stderr
    assert json.loads((exported / "tokenizer_config.json").read_text()) == {"eos_token": "</s>"}
    cfg = config_from_dict(checkpoint.load_state(str(step))["config"])
    ours = Transformer(cfg.model).eval()
    tensors = checkpoint.load_parts(str(step), "model")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(tensors[name])
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(5))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, **HF_LOGITS)
        # Training moved the weights: the export is not the starting folder.
        start = load_file(os.path.join(folder, "model.safetensors"))
        assert not torch.equal(start["model.embed_tokens.weight"], theirs.model.embed_tokens.weight)


def test_estimate_reads_only_config_json(folder, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), config_only)  # no weights at all
    code, out, err = main_in_process(
        capsys, "estimate", os.path.join(repo_root(), "configs", "finetune.yaml"), "--world", "2",
        f"model.init_from={config_only}", "parallel.zero=1", "train.seq_len=32",
    )  # fmt: skip
    assert code == 0, err
    n = sum(
        p.numel() for p in Transformer(load_config(None, [f"model.init_from={folder}"]).model).parameters()
    )
    assert f"{n:,} parameters" in out


def _copy(folder: str, tmp_path, name: str) -> str:
    bad = str(tmp_path / name)
    shutil.copytree(folder, bad)
    return bad


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path: str, **changes) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        values = json.load(f)
    values.update(changes)
    with open(file, "w") as f:
        json.dump(values, f)


def _bad_folders(folder: str, tmp_path) -> dict:
    cases = {}

    bad = _copy(folder, tmp_path, "no-config")
    os.remove(os.path.join(bad, "config.json"))
    cases["no-config"] = (bad, (), f"model.init_from='{bad}' has no config.json")

    bad = _copy(folder, tmp_path, "missing")
    _edit_tensors(bad, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    cases["missing-tensor"] = (bad, (), "tensor model.layers.1.self_attn.k_proj.bias is missing")

    bad = _copy(folder, tmp_path, "extra")
    _edit_tensors(bad, lambda t: t.update({"model.layers.9.mlp.gate_proj.weight": torch.zeros(2, 2)}))
    cases["extra-tensor"] = (bad, (), "tensor model.layers.9.mlp.gate_proj.weight is not part of the model")

    bad = _copy(folder, tmp_path, "shape")
    _edit_tensors(bad, lambda t: t.update({"model.norm.weight": torch.ones(47)}))
    cases["shape"] = (
        bad,
        (),
        "tensor model.norm.weight has shape [47], the model from config.json needs [48]",
    )

    bad = _copy(folder, tmp_path, "index")
    os.rename(os.path.join(bad, "model.safetensors"), os.path.join(bad, "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(bad, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    cases["index-names-missing-file"] = (bad, (), "names model-00002-of-00002.safetensors, which is not in")

    bad = _copy(folder, tmp_path, "type")
    _edit_config(bad, model_type="gpt2")
    cases["model-type"] = (
        bad,
        (),
        "model_type 'gpt2' is not supported; dtrain loads llama, mistral, qwen2, qwen3",
    )

    bad = _copy(folder, tmp_path, "window")
    _edit_config(bad, use_sliding_window=True, layer_types=["sliding_attention"] * 4)
    cases["sliding-window"] = (
        bad,
        (),
        "sliding-window attention layers (use_sliding_window / layer_types) is not",
    )

    cases["contradiction"] = (
        folder,
        ("model.d_model=64",),
        "model.d_model=64 contradicts "
        + os.path.join(folder, "config.json")
        + ", which gives 48; drop model.d_model",
    )

    bad = _copy(folder, tmp_path, "truncated")
    file = os.path.join(bad, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    cases["truncated"] = (bad, (), "is not a readable safetensors file")
    return cases


CASES = [
    "no-config",
    "missing-tensor",
    "extra-tensor",
    "shape",
    "index-names-missing-file",
    "model-type",
    "sliding-window",
    "contradiction",
    "truncated",
]


@pytest.fixture(scope="module")
def bad(folder, tmp_path_factory) -> dict:
    return _bad_folders(folder, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", CASES)
def test_bad_folders_are_refused_naming_the_problem(bad, case):
    path, overrides, message = bad[case]
    with pytest.raises(ConfigError) as e:
        check_init_from(load_config(None, [f"model.init_from={path}", *overrides]).model)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing-tensor", "contradiction"])
def test_the_command_line_says_it_in_one_line_and_writes_nothing(bad, case, tmp_path, capsys):
    path, overrides, message = bad[case]
    out = tmp_path / "never"
    config = os.path.join(repo_root(), "configs", "finetune.yaml")
    code, _, err = main_in_process(
        capsys, "train", config, f"model.init_from={path}", *overrides, f"run.out_dir={out}"
    )
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()

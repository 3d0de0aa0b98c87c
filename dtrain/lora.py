"""LoRA adapters out: a PEFT adapter folder, or the base with the adapters merged into its weights.

The adapters themselves are parallel/lora.py (`LoRALinear`, attached to every targeted projection by
dtrain.model.add_adapters). A trained checkpoint holds the adapters; `merge` and `export_peft` take the
canonical tensors of the whole model (dtrain.checkpoint.model_tensors: the checkpoint's adapters on the
base it names).

PEFT names: the adapter of `blocks.N.attn.wq` is saved as
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (and `lora_B`), which
`peft.PeftModel.from_pretrained(base, folder)` loads onto the transformers model of the base folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from dtrain.config import HF_PROJECTIONS, ConfigError, ModelConfig, lora_targets
from dtrain.hf import hf_name
from parallel.lora import is_adapter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_OF = {dtrain: hf for hf, dtrain in HF_PROJECTIONS.items()}


def _base_of(name: str) -> tuple[str, str]:
    """`blocks.N.attn.wq.lora_A.weight` -> (`blocks.N.attn.wq.weight`, `lora_A`)."""
    stem, which, _ = name.rsplit(".", 2)
    return f"{stem}.weight", which


def peft_name(name: str) -> str:
    base, which = _base_of(name)
    return "base_model.model." + hf_name(base).removesuffix(".weight") + f".{which}.weight"


def merge(tensors: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """W + (alpha / rank) * B A for every adapted weight (in float64, then the weight's dtype); the
    adapters leave the state."""
    scale = m.lora.alpha / m.lora.rank
    out = {k: v for k, v in tensors.items() if not is_adapter(k)}
    for name in tensors:
        base, which = _base_of(name) if is_adapter(name) else (None, None)
        if which == "lora_A":
            a, b = tensors[name].double(), tensors[name.replace("lora_A", "lora_B")].double()
            w = out[base]
            out[base] = (w.double() + scale * (b @ a)).to(w.dtype)
    return out


def adapter_config(m: ModelConfig) -> dict:
    """PEFT's LoraConfig as saved by save_pretrained, for dtrain's adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(m.init_from) if m.init_from else None,
        "r": m.lora.rank,
        "lora_alpha": m.lora.alpha,
        "lora_dropout": m.lora.dropout,
        "target_modules": sorted(_HF_OF[t] for t in lora_targets(m.lora)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_peft(tensors: dict[str, torch.Tensor], m: ModelConfig, out: str, dtype: torch.dtype) -> int:
    """Write adapter_config.json and adapter_model.safetensors at `out` (a new folder, which appears
    whole); returns the number of adapter tensors."""
    from safetensors.torch import save_file

    if not m.lora.rank:
        raise ConfigError("--format peft needs a checkpoint trained with model.lora.rank > 0")
    if os.path.exists(out):
        raise ConfigError(f"--out {out} exists; give a new folder (the export never overwrites)")
    named = {peft_name(k): v.to(dtype).contiguous() for k, v in tensors.items() if is_adapter(k)}
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(named, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(adapter_config(m), f, indent=2, sort_keys=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(named)

"""Hugging Face model folders in and out, for the model types llama, mistral, qwen2 and qwen3.

In: `model.init_from=DIR` takes the model's shape from DIR/config.json (`model_keys`, applied by
dtrain.config.load_config; a model.* value the user gave that contradicts it is an error) and its weights
from DIR's safetensors files (`HFWeights`): each rank reads only the rows or columns of its own tensor
shards and only the parameters of its own pipeline chunks (safetensors slices are read lazily from disk).

Out: `export_hf` writes a canonical state (a dtrain checkpoint's consolidated tensors) as a folder that
transformers loads: config.json, safetensors shards with an index past --max-shard-size, and the
tokenizer files of the folder the run started from. The folder appears complete or not at all.

Names: dtrain's canonical parameters map one to one onto the Hugging Face ones (`hf_name`); the rotary
convention is the same (rotate-half), so no tensor is permuted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import torch

from dtrain.config import ConfigError, ModelConfig, d_ff_of, head_dim_of

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
)

_ENDS = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some older exports saved; recomputed here


def hf_name(name: str) -> str:
    """The Hugging Face tensor name of canonical parameter `name`."""
    if name in _ENDS:
        return _ENDS[name]
    _, index, rest = name.split(".", 2)  # blocks.<i>.<rest>
    return f"model.layers.{index}.{_BLOCK[rest]}"


# --- config.json <-> model.* keys ---------------------------------------------------------------------


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise ConfigError(
            f"model.init_from={folder!r} is not a folder; give a local Hugging Face model folder"
        )
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(
            f"model.init_from={folder!r} has no config.json; give a Hugging Face model folder "
            f"(config.json and model.safetensors or model-*.safetensors with {INDEX})"
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return hf


def _rope(hf: dict) -> dict:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (earlier), as one dict."""
    if isinstance(hf.get("rope_parameters"), dict):
        return hf["rope_parameters"]
    return {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}


def model_keys(hf: dict, source: str) -> dict[str, Any]:
    """model.* values from a config.json; what would change the maths and dtrain does not implement is
    refused, naming it."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ConfigError(
            f"{source}: model_type {kind!r} is not supported; dtrain loads {', '.join(SUPPORTED)}"
        )

    def refuse(what: str) -> None:
        raise ConfigError(f"{source}: {what} is not implemented by dtrain; use a model without it")

    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r} (dtrain's MLP is SwiGLU with silu)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias=true")
    if kind != "qwen2" and hf.get("attention_bias"):
        refuse("attention_bias=true (a bias on the attention output projection)")
    if kind == "mistral" and hf.get("sliding_window") is not None:
        refuse(f"sliding_window={hf['sliding_window']} (sliding-window attention)")
    if kind in ("qwen2", "qwen3"):
        types = hf.get("layer_types") or (["sliding_attention"] if hf.get("use_sliding_window") else [])
        if "sliding_attention" in types:
            refuse("sliding-window attention layers (use_sliding_window / layer_types)")
    if hf.get("attention_dropout", 0.0):
        refuse(f"attention_dropout={hf['attention_dropout']}")
    rope = _rope(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling: dict[str, Any] = {"type": "none"}
    if rope_type == "llama3":
        scaling = {
            "type": "llama3",
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_seq_len": int(rope["original_max_position_embeddings"]),
        }
    elif rope_type != "default":
        refuse(f"rope scaling of type {rope_type!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise ConfigError(f"{source}: {key} is missing or not an integer")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and d % heads == 0 and head_dim == d // heads:
        head_dim = None  # the default, d_model / n_heads
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "d_ff": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": kind == "qwen2",
        "qk_norm": kind == "qwen3",
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_init_from(merged, layers: list) -> None:
    """Fill merged.model from config.json of merged.model.init_from; `layers` are the user's YAML and
    overrides, whose model.* values must agree with it (omegaconf DictConfigs)."""
    from omegaconf import OmegaConf

    folder = merged.model.init_from
    source = os.path.join(folder, CONFIG)
    keys = _flatten(model_keys(read_config(folder), source))
    if merged.model.moe.num_experts:
        raise ConfigError("model.moe.num_experts with model.init_from: these families have no experts")
    for layer in layers:
        given = _flatten(OmegaConf.to_container(layer).get("model") or {})
        for key, value in given.items():
            if key in keys and value is not None and value != keys[key]:
                raise ConfigError(
                    f"model.{key}={value!r} contradicts {source}, which gives {keys[key]!r}; drop "
                    f"model.{key} "
                    f"(with model.init_from the shape comes from config.json)"
                )
    for key, value in keys.items():
        OmegaConf.update(merged, f"model.{key}", value, merge=False)


def hf_config(m: ModelConfig, base: dict | None = None, dtype: str = "float32") -> dict:
    """config.json for model `m`: the original folder's (`base`) with every shape key set from `m`, or a
    new one of the family `m` belongs to."""
    if m.qkv_bias and m.qk_norm:
        raise ConfigError(
            "no Hugging Face family has both model.qkv_bias and model.qk_norm; export with --format pt"
        )
    if m.moe.num_experts:
        raise ConfigError(
            "a mixture-of-experts model has no Hugging Face family here; export with --format pt"
        )
    kind = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"
    if kind == "llama" and (base or {}).get("model_type") == "mistral":
        kind = "mistral"  # the same maths with its window off: keep the starting folder's family
    out = {
        k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling.type == "llama3":
        s = m.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_seq_len,
        )
    out.update(
        architectures=[ARCHITECTURES[kind]],
        model_type=kind,
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=d_ff_of(m),
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads,
        head_dim=head_dim_of(m),
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu",
        attention_bias=m.qkv_bias,
        attention_dropout=0.0,
        rope_theta=m.rope_theta,
        rope_scaling=None
        if m.rope_scaling.type == "none"
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        torch_dtype=dtype,
    )
    if kind == "mistral":
        out["sliding_window"] = None
    if kind in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, layer_types=["full_attention"] * m.n_layers)
    return out


# --- weights in -----------------------------------------------------------------------------------------


class HFWeights:
    """The safetensors files of a Hugging Face folder: which file holds each tensor, its shape from the
    headers, and this rank's slices of it read on demand."""

    def __init__(self, folder: str):
        from safetensors import SafetensorError, safe_open

        self.folder, self._open, self._handles = folder, safe_open, {}
        index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{index} is not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, files = None, [SINGLE]
        else:
            raise ConfigError(f"model.init_from={folder!r} has neither {SINGLE} nor {INDEX}")
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise ConfigError(f"{index} names {name}, which is not in {folder}")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = os.path.join(folder, name)
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self.file_of[key] = name
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConfigError(
                    f"{path} is not a readable safetensors file ({e}); the download may be truncated"
                ) from None
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.file_of.get(key) != name:
                    raise ConfigError(f"{index} places {key} in {name}, which does not hold it")

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every canonical parameter (name -> full shape) present with its shape, and nothing else."""
        wanted = {hf_name(name): shape for name, shape in expected.items()}
        for key, shape in wanted.items():
            if key not in self.shapes:
                raise ConfigError(f"{self.folder}: tensor {key} is missing")
            if self.shapes[key] != tuple(shape):
                raise ConfigError(
                    f"{self.folder}: tensor {key} has shape {list(self.shapes[key])}, the model from "
                    f"config.json needs {list(shape)}"
                )
        tied_head = "lm_head.weight" not in wanted and "model.embed_tokens.weight" in wanted
        for key in self.shapes:
            if key not in wanted and not _IGNORED.search(key) and not (tied_head and key == "lm_head.weight"):
                raise ConfigError(
                    f"{self.folder}: tensor {key} is not part of the model config.json describes"
                )

    def read(self, name: str, sharding) -> torch.Tensor:
        """This rank's part of canonical parameter `name` (sharding: its parallel.sharding.Sharding),
        reading only those rows or columns from disk."""
        key = hf_name(name)
        file = self.file_of[key]
        if file not in self._handles:
            self._handles[file] = self._open(os.path.join(self.folder, file), framework="pt").__enter__()
        piece = self._handles[file].get_slice(key)
        if sharding.split_dim is None:
            return piece[:]
        start, stop, zeros = sharding.local_range()
        index = [slice(None)] * len(sharding.full_shape)
        index[sharding.split_dim] = slice(start, stop)
        part = piece[tuple(index)]
        if zeros:  # the padded end of a vocabulary split over tensor ranks
            shape = list(part.shape)
            shape[sharding.split_dim] = zeros
            part = torch.cat([part, part.new_zeros(shape)], dim=sharding.split_dim)
        return part

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles = {}


def check_init_from(m: ModelConfig) -> None:
    """Before any process starts: the folder's tensors are exactly the model's (names and shapes read from
    the safetensors headers, no weights)."""
    if not m.init_from:
        return
    from dtrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(m)
    from parallel.lora import is_adapter

    base = {name: tuple(p.shape) for name, p in model.named_parameters() if not is_adapter(name)}
    HFWeights(m.init_from).check(base)  # adapters (model.lora) start from their own initial values


# --- weights out ----------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def default_dtype(m: ModelConfig) -> str:
    """The dtype the starting folder's weights were stored in (bf16 or fp32), else fp32."""
    if m.init_from and os.path.isfile(os.path.join(m.init_from, CONFIG)):
        with open(os.path.join(m.init_from, CONFIG), encoding="utf-8") as f:
            stored = json.load(f)
        if (stored.get("torch_dtype") or stored.get("dtype")) == "bfloat16":
            return "bf16"
    return "fp32"


def export_hf(
    tensors: dict[str, torch.Tensor], m: ModelConfig, out: str, dtype: str, max_shard_bytes: int
) -> int:
    """Write canonical `tensors` as a Hugging Face folder at `out` (which must not exist yet); returns the
    number of files written."""
    from safetensors.torch import save_file

    if os.path.exists(out):
        raise ConfigError(f"--out {out} exists; give a new folder (the export never overwrites)")
    base = None
    if m.init_from and os.path.isfile(os.path.join(m.init_from, CONFIG)):
        base = read_config(m.init_from)
    config = hf_config(m, base, _DTYPE_NAMES[dtype])
    named = {hf_name(k): v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    if m.tie_embeddings:
        named.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(named):  # greedy in name order, one shard past the limit
        nbytes = named[key].numel() * named[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = named[key]
        size += nbytes
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        names = (
            [SINGLE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in named.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard},
            }
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name in TOKENIZER_FILES if m.init_from else ():
            src = os.path.join(m.init_from, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        os.rename(tmp, out)  # atomic on one filesystem: the folder appears whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(os.listdir(out))

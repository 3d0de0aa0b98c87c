"""Configuration: the schema (omegaconf structured dataclasses) and loading with dotted overrides; the
rules across keys are dtrain/validation.py. Both run before any process group exists.

Every error raised here is a `ConfigError` whose message is one line naming the key, the value and what
would be valid; the CLI prints it and exits non-zero without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration the run cannot use; the message says which key to change."""


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense MLP
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    every_n_layers: int = 1  # blocks n-1, 2n-1, ... get the MoE MLP (1 = every block)


@dataclass
class RopeScalingConfig:
    """Llama 3.1's rotary frequency scaling (type llama3): wavelengths longer than
    original_max_seq_len / low_freq_factor are stretched by `factor`, shorter than
    original_max_seq_len / high_freq_factor kept, the band between interpolated."""

    type: str = "none"  # none | llama3
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


# Projection names a LoRA adapter can target: dtrain's, and the Hugging Face ones they map onto.
LORA_TARGETS = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w1": "mlp", "w2": "mlp", "w3": "mlp"}
HF_PROJECTIONS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
}


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021): y = W x + (alpha / rank) * B A dropout(x) on each targeted
    projection of every block; the base model is frozen. rank 0 = off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])


def lora_targets(lora: LoRAConfig) -> list[str]:
    """The targets as dtrain projection names (Hugging Face names mapped), in a fixed order."""
    wanted = {HF_PROJECTIONS.get(t, t) for t in lora.targets}
    return [t for t in LORA_TARGETS if t in wanted]


@dataclass
class ModelConfig:
    init_from: str | None = None  # a local Hugging Face model folder: shape from config.json, its weights
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None = d_model / n_heads
    d_ff: int | None = None  # None = the Llama rule: 2/3 * 4 * d_model rounded up to a multiple of 16
    max_seq_len: int = 128
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each query and key head before the rotation (Qwen3)
    dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ParallelConfig:
    dp: int = -1  # -1 = whatever the other dimensions leave of the world
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sp: bool = False
    zero: int = 0
    dp_shard: int = -1  # ZeRO shard group size in ranks of dp x cp; -1 = all of them (one replica)
    offload: str = "none"
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    pp_split_backward: bool = True  # each chunk's last backward sends dX before computing weight gradients
    bucket_mb: float = 25.0
    grad_dtype: str = "fp32"


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    precision: str = "fp32"
    seed: int = 1234
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block's forward (inductor)
    eval_every: int = 0  # 0 = only at the end of the run
    eval_batches: int = 2
    peak_tflops: float | None = None  # None = look the device up (GPUs only)
    max_skipped_steps: int = 0  # fp16: stop after this many consecutive overflowing steps (0 = never)
    sample_every: int = 0  # log a continuation of sample_prompt every N steps (0 = never)
    sample_prompt: str | None = None
    sample_tokens: int = 32
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of canonical parameter names


@dataclass
class MixSource:
    path: str = ""  # a folder written by `dtrain prepare-data`
    weight: float = 1.0  # relative share of the rows of every global batch


@dataclass
class DataConfig:
    kind: str = "synthetic"
    path: str | None = None  # memmap: a .npy token file, or a folder holding train.npy (and val.npy)
    packing: bool = True  # documents: several whole documents per row (else one per row, padded)
    mix: list[MixSource] = field(default_factory=list)  # memmap: several prepared folders, weighted


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    log_every: int = 10
    # The communication ledger counts one logging step in this many (the first included); 1 = every one.
    ledger_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3  # 0 = keep all
    resume: Any = False  # false | true | path to a checkpoint folder
    # A fresh run (resume=false) into an out_dir that holds an earlier run's outputs is refused; true moves
    # those outputs aside into out_dir/replaced-<date>-<time>/ first (nothing is deleted).
    overwrite: bool = False


@dataclass
class DistConfig:
    backend: str = "auto"
    timeout_s: float = 300.0
    nproc_per_node: int | None = (
        None  # what `python -m launch` starts when parallel.dp=-1 (None: one per GPU)
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)


CHOICES = {
    "parallel.offload": ("none", "optimizer", "all"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved"),
    "parallel.grad_dtype": ("fp32", "bf16"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "data.kind": ("synthetic", "memmap"),
    "dist.backend": ("auto", "gloo", "nccl"),
}

# Layout features not implemented yet: a config asking for one is refused up front
# rather than silently trained as plain data parallelism.
NOT_YET: dict[str, tuple] = {}


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(v, dict | DictConfig):
            keys += _all_keys(v, name + ".")
    return keys


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        known = _all_keys(OmegaConf.to_container(schema))
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{near[0]}'?" if near else "; see the config reference in README.md"
        return ConfigError(f"unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        node: Any = Config
        for part in key.split("."):
            node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
        want = getattr(node, "__name__", str(node)) if node is not None else "another type"
        return ConfigError(f"{key}={getattr(err, 'value', '?')!r} has the wrong type (expected {want})")
    return ConfigError(f"config error at '{key}': {str(err).splitlines()[0]}")


# `${name:...}` calls an omegaconf resolver (oc.env reads environment variables, oc.decode parses); plain
# `${section.key}` only copies another config value.
_RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")


def _check_layer(layer: Any, schema: DictConfig, source: str) -> None:
    """A YAML file or the overrides, before merging: a mapping, sections given as sections, and no
    resolvers, so a config is data: nothing in it runs or reads the environment (values end up in
    checkpoints and logs)."""
    if not isinstance(layer, DictConfig):
        raise ConfigError(
            f"{source} must be a mapping of sections (model:, train:, ...), not a list or value"
        )

    def walk(node: Any, spec: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            sub = spec.get(key) if isinstance(spec, dict) else None
            if isinstance(sub, dict) and not isinstance(value, dict):
                example = f"{name}.{next(iter(sub))}"
                raise ConfigError(
                    f"{name}={value!r} in {source}: {name} is a section; set its keys, e.g. {example}"
                )
            if isinstance(value, dict):
                walk(value, sub, name + ".")
            elif isinstance(value, str) and _RESOLVER.search(value):
                raise ConfigError(
                    f"{name}={value!r} in {source} calls an omegaconf resolver; configs are data: write the "
                    f"value itself (a plain ${{section.key}} reference is allowed)"
                )

    walk(OmegaConf.to_container(layer, resolve=False), OmegaConf.to_container(schema, resolve=False), "")


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, type-checked by omegaconf."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(
                f"config file '{path}' does not exist; pass a YAML file such as configs/tiny.yaml"
            )
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml errors carry multi-line context; keep the first line
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        _check_layer(layers[-1], schema, f"config file '{path}'")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example train.steps=20)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
            _check_layer(layers[-1], schema, "the overrides")
        merged = OmegaConf.merge(schema, *layers)
        if merged.model.init_from:
            from dtrain.hf import apply_init_from

            apply_init_from(merged, layers)  # the shape from the folder's config.json
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from None
    return cfg


def config_from_dict(values: dict) -> Config:
    """A config saved with a checkpoint (state.json) back into the schema."""
    schema = OmegaConf.structured(Config)
    try:
        _check_layer(OmegaConf.create(values), schema, "the checkpoint's config")
        return OmegaConf.to_object(OmegaConf.merge(schema, values))
    except OmegaConfBaseException as e:
        raise _explain(e, OmegaConf.structured(Config)) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def head_dim_of(m: ModelConfig) -> int:
    return m.head_dim if m.head_dim is not None else m.d_model // m.n_heads


def d_ff_of(m: ModelConfig) -> int:
    if m.d_ff is not None:
        return m.d_ff
    return int(math.ceil(2 * 4 * m.d_model / 3 / 16) * 16)


def microbatches_per_rank(cfg: Config) -> int:
    return cfg.train.global_batch_size // (cfg.parallel.dp * cfg.train.micro_batch_size)

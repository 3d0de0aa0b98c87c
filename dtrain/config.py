"""Configuration: the schema (omegaconf structured dataclasses), loading with dotted overrides, and
validation that runs before any process group exists.

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


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _validate_pipeline(m: ModelConfig, p: ParallelConfig, microbatches: int) -> None:
    v = p.pp_virtual_stages
    _require(v >= 1, f"parallel.pp_virtual_stages={v} must be at least 1")
    if p.pp == 1:
        return
    if p.pp_schedule == "interleaved":
        _require(v >= 2, f"parallel.pp_schedule=interleaved needs parallel.pp_virtual_stages >= 2, got {v}")
        _require(
            microbatches % p.pp == 0,
            f"parallel.pp_schedule=interleaved needs micro-batches per rank ({microbatches} = "
            f"global_batch_size / (dp * micro_batch_size)) to be a multiple of parallel.pp={p.pp}",
        )
    else:
        _require(v == 1, f"parallel.pp_virtual_stages={v} needs parallel.pp_schedule=interleaved")
    if p.pp_schedule == "1f1b":
        _require(
            microbatches >= p.pp,
            f"parallel.pp_schedule=1f1b needs at least parallel.pp={p.pp} micro-batches per rank, got "
            f"{microbatches}; raise train.global_batch_size or lower train.micro_batch_size",
        )
    chunks = p.pp * (v if p.pp_schedule == "interleaved" else 1)
    _require(
        m.n_layers >= chunks,
        f"model.n_layers={m.n_layers} cannot be split into {chunks} pipeline chunks "
        f"(parallel.pp * pp_virtual_stages); lower parallel.pp or pp_virtual_stages",
    )


def _validate_lora(m: ModelConfig, freeze: list[str]) -> None:
    lora = m.lora
    _require(lora.rank >= 0, f"model.lora.rank={lora.rank} must be >= 0 (0 = no adapters)")
    if lora.rank:
        _require(lora.alpha > 0, f"model.lora.alpha={lora.alpha} must be positive")
        _require(0.0 <= lora.dropout < 1.0, f"model.lora.dropout={lora.dropout} must be in [0, 1)")
        _require(bool(lora.targets), "model.lora.targets is empty; name projections such as [wq, wv]")
        known = [*LORA_TARGETS, *HF_PROJECTIONS]
        for target in lora.targets:
            _require(
                HF_PROJECTIONS.get(target, target) in LORA_TARGETS,
                f"model.lora.targets: {target!r} matches no layer; choose from {', '.join(known)}",
            )
        mlp = [t for t in lora_targets(lora) if LORA_TARGETS[t] == "mlp"]
        _require(
            not (mlp and m.moe.num_experts),
            f"model.lora.targets {', '.join(mlp)} with model.moe.num_experts={m.moe.num_experts}: adapters "
            f"on experts are not supported; target attention projections (wq, wk, wv, wo) only",
        )
    if freeze:
        import fnmatch

        import torch

        from dtrain.model import Transformer, canonical_name  # the model module imports this one

        with torch.device("meta"):
            names = [canonical_name(n, m) for n, _ in Transformer(m).named_parameters()]
        for pattern in freeze:
            _require(
                any(fnmatch.fnmatchcase(n, pattern) for n in names),
                f"train.freeze: {pattern!r} matches no parameter (canonical names such as "
                f"blocks.0.attn.wq.weight, embed.weight)",
            )


def _validate_moe(moe: MoEConfig, n_layers: int, p: ParallelConfig, microbatch_tokens: int) -> None:
    e = moe.num_experts
    _require(e >= 0, f"model.moe.num_experts={e} must be >= 0 (0 = dense MLP)")
    if e == 0:
        _require(p.ep == 1, f"parallel.ep={p.ep} needs experts; set model.moe.num_experts or parallel.ep=1")
        return
    _require(1 <= moe.top_k <= e, f"model.moe.top_k={moe.top_k} must be in [1, model.moe.num_experts={e}]")
    _require(e % p.ep == 0, f"parallel.ep={p.ep} must divide model.moe.num_experts={e}")
    _require(
        1 <= moe.every_n_layers <= n_layers,
        f"model.moe.every_n_layers={moe.every_n_layers} must be in [1, model.n_layers={n_layers}]",
    )
    for key in ("aux_loss_coef", "z_loss_coef"):
        value = getattr(moe, key)
        _require(value >= 0, f"model.moe.{key}={value} must be >= 0")
    capacity = math.floor(moe.capacity_factor * microbatch_tokens * moe.top_k / e)
    _require(
        capacity >= 1,
        f"model.moe.capacity_factor={moe.capacity_factor} gives experts no room (capacity "
        f"floor(factor * {microbatch_tokens} tokens * top_k / experts) = {capacity}); raise it",
    )


def _validate_dp_shard(p: ParallelConfig) -> None:
    """Hybrid sharding: ZeRO over shard groups of dp_shard ranks of dp x cp, replicated across them
    (parallel/grid.py); -1 is filled in as the whole dp x cp group."""
    group = p.dp * p.cp
    if p.dp_shard == -1:
        p.dp_shard = group
        return
    _require(
        p.dp_shard >= 1 and group % p.dp_shard == 0,
        f"parallel.dp_shard={p.dp_shard} must divide parallel.dp*cp={group} (or be -1 for all of them)",
    )
    _require(
        p.zero >= 1 or p.dp_shard == group,
        f"parallel.dp_shard={p.dp_shard} shards ZeRO state; it needs parallel.zero >= 1 (or dp_shard=-1)",
    )
    _require(
        p.dp_shard % (p.cp * p.ep) == 0,
        f"parallel.dp_shard={p.dp_shard} must be a multiple of parallel.cp*ep={p.cp * p.ep}, so a shard "
        f"group holds whole context groups and the same share of every expert",
    )


def _validate_context_parallel(cfg: Config) -> None:
    """parallel.cp > 1: the sequence is cut into 2 * cp load-balanced chunks (parallel.context_parallel);
    attention is causal ring attention (masked to documents when they are packed), without dropout."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _require(
        t.seq_len % (2 * p.cp) == 0,
        f"train.seq_len={t.seq_len} must be divisible by 2*parallel.cp={2 * p.cp} (load-balanced chunks)",
    )
    if p.sp or m.moe.num_experts:  # the rank's chunks are split again over tp
        _require(
            t.seq_len // p.cp % p.tp == 0,
            f"train.seq_len/parallel.cp={t.seq_len // p.cp} must be divisible by parallel.tp={p.tp} "
            + ("for sequence parallelism" if p.sp else "(MoE layers split tokens over tp)"),
        )
    _require(m.dropout == 0, f"model.dropout={m.dropout}: ring attention has no dropout; set it to 0 with cp")


def _validate_compile(m: ModelConfig, p: ParallelConfig) -> None:
    """train.compile traces each block into one graph: collectives inside a block (tensor-parallel
    all-reduces in custom autograd functions, ring attention's send/recv) and expert routing's
    data-dependent split sizes do not trace, so those layouts are refused."""
    for what, used in (
        (f"parallel.tp={p.tp}", p.tp > 1),
        (f"parallel.cp={p.cp}", p.cp > 1),
        (f"model.moe.num_experts={m.moe.num_experts}", m.moe.num_experts > 0),
    ):
        _require(not used, f"train.compile=true with {what} is not supported; set train.compile=false")


def validate(cfg: Config, world_size: int) -> Config:
    """Check everything that can be checked without processes; fill in `parallel.dp` when it is -1.

    Called before any process group is created, so a bad config costs nothing but one line.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")

    for key in ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.max_seq_len"):
        value = getattr(m, key.split(".")[1])
        _require(value > 0, f"{key}={value} must be positive")
    if m.head_dim is None:
        _require(
            m.d_model % m.n_heads == 0,
            f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model} (or set model.head_dim)",
        )
    head_dim = head_dim_of(m)
    _require(
        head_dim > 0 and head_dim % 2 == 0,
        f"the head dimension {head_dim} must be even for rotary embeddings",
    )
    rs = m.rope_scaling
    _require(
        rs.type in ("none", "llama3"),
        f"model.rope_scaling.type={rs.type!r} is not valid; choose none or llama3",
    )
    if rs.type == "llama3":
        _require(
            rs.factor >= 1 and 0 < rs.low_freq_factor < rs.high_freq_factor and rs.original_max_seq_len > 0,
            "model.rope_scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
            "original_max_seq_len > 0",
        )
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    _require(
        kv > 0 and m.n_heads % kv == 0,
        f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads} (grouped-query attention)",
    )
    _require(d_ff_of(m) > 0, f"model.d_ff={m.d_ff} must be positive")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")

    for key in ("parallel.tp", "parallel.pp", "parallel.cp", "parallel.ep"):
        value = getattr(p, key.split(".")[1])
        _require(value >= 1, f"{key}={value} must be at least 1")
    _require(p.dp == -1 or p.dp >= 1, f"parallel.dp={p.dp} must be at least 1, or -1 to fill the world")
    _require(p.bucket_mb > 0, f"parallel.bucket_mb={p.bucket_mb} must be positive")
    _require(p.zero in (0, 1, 2, 3), f"parallel.zero={p.zero} is not valid; choose 0, 1, 2 or 3")
    model_ranks = p.tp * p.pp * p.cp
    if p.dp == -1:
        _require(
            world_size % model_ranks == 0,
            f"world size {world_size} is not divisible by tp*pp*cp={model_ranks}; "
            f"change parallel.tp/pp/cp or the process count",
        )
        p.dp = world_size // model_ranks
    _require(
        p.dp * model_ranks == world_size,
        f"parallel.dp*tp*pp*cp={p.dp * model_ranks} does not match the world size {world_size}; "
        f"set parallel.dp=-1 or launch {p.dp * model_ranks} processes",
    )
    _require(p.dp % p.ep == 0, f"parallel.ep={p.ep} must divide parallel.dp={p.dp}")
    _validate_dp_shard(p)
    if p.tp > 1:
        _require(m.n_heads % p.tp == 0, f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}")
        # Fewer k/v heads than tensor ranks: each rank holds them all and uses the one its query heads
        # share, which needs n_kv_heads to divide tp.
        _require(
            kv % p.tp == 0 if kv >= p.tp else p.tp % kv == 0,
            f"parallel.tp={p.tp} and model.n_kv_heads={kv}: one must divide the other",
        )
        _require(d_ff_of(m) % p.tp == 0, f"parallel.tp={p.tp} must divide model.d_ff={d_ff_of(m)}")
    _require(
        p.offload != "all" or p.zero == 3,
        f"parallel.offload=all keeps parameter shards in host memory: it needs parallel.zero=3, not {p.zero}",
    )
    _require(
        p.grad_dtype == "fp32" or t.precision == "bf16",
        f"parallel.grad_dtype={p.grad_dtype} reduces bf16 parameters' gradients in bf16: it needs "
        f"train.precision=bf16, not {t.precision}",
    )
    _require(
        p.offload == "none" or p.zero >= 1,
        f"parallel.offload={p.offload} needs parallel.zero >= 1 (the offloaded state is the sharded one)",
    )
    if p.sp:
        _require(
            t.seq_len % p.tp == 0,
            f"train.seq_len={t.seq_len} must be divisible by parallel.tp={p.tp} for sequence parallelism",
        )

    if p.cp > 1:
        _validate_context_parallel(cfg)

    for key, (neutral, what) in NOT_YET.items():
        parts = key.split(".")
        node = cfg
        for part in parts:
            node = getattr(node, part)
        _require(node == neutral, f"{key}={node!r}: {what} is not implemented yet; set {key}={neutral!r}")

    for key in ("train.steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_len"):
        value = getattr(t, key.split(".")[1])
        _require(value > 0, f"{key}={value} must be positive")
    per_step = p.dp * t.micro_batch_size
    _require(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size={t.global_batch_size} must be a multiple of "
        f"parallel.dp*train.micro_batch_size={per_step}",
    )
    _validate_pipeline(m, p, t.global_batch_size // per_step)
    _validate_moe(m.moe, m.n_layers, p, t.micro_batch_size * t.seq_len)
    _require(
        t.seq_len <= m.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
        + (
            "lower train.seq_len (the model's max_position_embeddings bounds it)"
            if m.init_from
            else "raise model.max_seq_len"
        ),
    )
    _require(t.lr > 0, f"train.lr={t.lr} must be positive")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _require(t.eval_batches >= 0, f"train.eval_batches={t.eval_batches} must be >= 0")
    _require(t.sample_every >= 0, f"train.sample_every={t.sample_every} must be >= 0 (0 = never)")
    if t.sample_every:
        _require(bool(t.sample_prompt), "train.sample_every needs train.sample_prompt, the text to continue")
        _require(t.sample_tokens >= 1, f"train.sample_tokens={t.sample_tokens} must be at least 1")
        _require(
            m.moe.num_experts == 0,
            "train.sample_every: dtrain generates with dense models only; set train.sample_every=0",
        )

    _validate_lora(m, t.freeze)
    if t.compile:
        _validate_compile(m, p)

    d = cfg.data
    if d.mix:
        _require(d.kind == "memmap", f"data.mix needs data.kind=memmap, not {d.kind!r}")
        _require(d.path is None, "give data.path or data.mix, not both")
        for i, source in enumerate(d.mix):
            _require(
                source.weight > 0 and math.isfinite(source.weight),
                f"data.mix[{i}].weight={source.weight} must be positive (leave the folder out instead)",
            )
            _require(
                os.path.isdir(source.path),
                f"data.mix[{i}].path={source.path!r} is not a folder; create it with `dtrain prepare-data`",
            )
    elif d.kind == "memmap":
        _require(d.path is not None, "data.kind=memmap needs data.path (a .npy file or a folder) or data.mix")
        _require(
            os.path.exists(d.path),
            f"data.path={d.path!r} does not exist; create it with `dtrain prepare-data`",
        )

    r = cfg.run
    _require(r.log_every >= 1, f"run.log_every={r.log_every} must be at least 1")
    _require(
        r.ledger_every >= 1,
        f"run.ledger_every={r.ledger_every} must be at least 1 (the ledger counts one logging step in N)",
    )
    _require(r.ckpt_every >= 0, f"run.ckpt_every={r.ckpt_every} must be >= 0 (0 = only at the end)")
    _require(r.keep_checkpoints >= 0, f"run.keep_checkpoints={r.keep_checkpoints} must be >= 0")
    _require(
        isinstance(r.resume, bool | str),
        f"run.resume={r.resume!r} must be true, false or a checkpoint folder",
    )
    if isinstance(r.resume, str) and r.resume.lower() in ("true", "false"):
        r.resume = r.resume.lower() == "true"
    if isinstance(r.resume, str):
        _require(os.path.isdir(r.resume), f"run.resume={r.resume!r} is not a checkpoint folder")
    n = cfg.dist.nproc_per_node
    _require(n is None or n >= 1, f"dist.nproc_per_node={n} must be at least 1 (or null: one per GPU)")
    _require(cfg.dist.timeout_s > 0, f"dist.timeout_s={cfg.dist.timeout_s} must be positive")
    return cfg

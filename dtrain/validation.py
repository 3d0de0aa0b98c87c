"""Validation of a loaded config: everything that can be checked without processes, each refusal one line
naming what to change (ConfigError), before any process group exists; `validate` also fills in
parallel.dp when it is -1. The schema, loading and overrides are dtrain/config.py."""

from __future__ import annotations

import math
import os

from dtrain.config import (
    CHOICES,
    HF_PROJECTIONS,
    LORA_TARGETS,
    NOT_YET,
    Config,
    ConfigError,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    d_ff_of,
    head_dim_of,
    lora_targets,
)


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

"""Text from a trained model: `dtrain generate MODEL`, and the model folders `dtrain eval` reads.

MODEL is a dtrain checkpoint folder (canonical full tensors and the resolved config, whatever layout
saved it) or a Hugging Face model folder (config.json and safetensors). Generation runs the whole model in
one process: on one GPU when there is one in bf16, else on the CPU in fp32. A 16-bit model computes as
training computes: its parameters stored in that dtype (the weights rounded to nearest), no autocast, the
model widening norms, rotary and softmax statistics itself; keys and values are cached in it too.
Several prompts run as one batch, left-padded; dtrain.kv_cache keeps every row's positions and attention
as if it ran alone, so a batch gives what each prompt gives by itself, up to rounding.

Decoding, per step: greedy (temperature 0) takes the most likely token; otherwise the logits are divided
by the temperature, the top-k most likely tokens kept (k = 0 keeps all), then the smallest set of most
likely tokens whose probability reaches top-p, and one token is drawn from what is left, renormalised,
with a generator seeded by --seed. A row ends at an end-of-sequence id (kept in its output, as
transformers keeps it), after max_new_tokens, or when it fills model.max_seq_len.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from dtrain.checkpoint import CheckpointError
from dtrain.config import Config, ConfigError
from dtrain.kv_cache import KVCache
from dtrain.model import Transformer

# --- model folders --------------------------------------------------------------------------------------


class _Tokenizer:
    """Text <-> ids: a Hugging Face tokenizer.json through the `tokenizers` library, or UTF-8 bytes for
    byte-level models. Kept private and small so that a shared tokenizer module can replace it."""

    def __init__(self, encode, decode, source: str, byte_level: bool = False):
        self.encode, self.decode, self.source, self.byte_level = encode, decode, source, byte_level


def _byte_tokenizer() -> _Tokenizer:
    return _Tokenizer(
        lambda text: list(text.encode("utf-8")),
        lambda ids: bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace"),
        "byte-level (UTF-8 bytes)",
        byte_level=True,
    )


def _hf_tokenizer(folder: str) -> _Tokenizer | None:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the library's errors are Rust panics and plain Exceptions
        raise ConfigError(f"{path} is not a tokenizer the tokenizers library reads ({e})") from None
    # As transformers' tokenizer(text): special tokens (a bos) added by the file's post-processor; decoded
    # text leaves special tokens (an eos) out.
    return _Tokenizer(
        lambda text: tok.encode(text).ids, lambda ids: tok.decode(ids, skip_special_tokens=True), path
    )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _eos_ids(folder: str) -> frozenset[int]:
    """End-of-sequence ids as transformers' generate takes them: generation_config.json, else config.json,
    else tokenizer_config.json's eos_token looked up in tokenizer.json."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(os.path.join(folder, name)).get("eos_token_id")
        if isinstance(value, int):
            return frozenset([value])
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return frozenset(value)
    token = _read_json(os.path.join(folder, "tokenizer_config.json")).get("eos_token")
    if isinstance(token, dict):  # the AddedToken form
        token = token.get("content")
    if isinstance(token, str) and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from tokenizers import Tokenizer

        found = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).token_to_id(token)
        if found is not None:
            return frozenset([found])
    return frozenset()


@dataclass
class ModelSource:
    """A model folder resolved without reading weights: its config, tokenizer and end-of-sequence ids."""

    path: str
    kind: str  # checkpoint | hf
    cfg: Config
    tokenizer: _Tokenizer | None
    eos_ids: frozenset[int] = field(default_factory=frozenset)

    def build(self, device: torch.device, precision: str = "fp32") -> Transformer:
        """The whole model with this folder's weights, in eval mode on `device`, its parameters stored in
        `precision`'s dtype (fp32, bf16 or fp16)."""
        from dtrain.model import init_weights

        model = Transformer(self.cfg.model)
        if self.kind == "checkpoint":
            load_checkpoint_weights(self.path, [model])
        else:
            from dtrain.hf import HFWeights

            weights = HFWeights(self.path)
            init_weights(model, 0, weights.read)
            weights.close()
        return in_precision(model.to(device).eval(), precision)


def in_precision(model: Transformer, precision: str) -> Transformer:
    """`model` with its parameters stored in `precision`'s dtype (rounded to nearest; buffers such as the
    rotary tables keep theirs), as dtrain's 16-bit training stores them."""
    from parallel.mixed_precision import to_compute_
    from parallel.precision import dtype_policy

    dtype = dtype_policy(precision).param_dtype
    if dtype is not None:
        to_compute_(list(model.parameters()), dtype)
    return model


def load_checkpoint_weights(path: str, models: list[torch.nn.Module]) -> None:
    """Copy a checkpoint's canonical tensors into the parameters of `models` (a whole model, or this rank's
    chunks: their slices of the tensors)."""
    from dtrain.checkpoint import model_tensors

    copy_canonical(model_tensors(path), models, path)


def copy_canonical(tensors: dict[str, torch.Tensor], models: list[torch.nn.Module], source: str) -> None:
    """Copy canonical full tensors (name -> tensor) into the parameters of `models`; `source` names where
    the tensors came from in the error."""
    from parallel.sharding import sharding_of

    with torch.no_grad():
        for name, p in (item for model in models for item in model.named_parameters()):
            s = sharding_of(p)
            full = tensors.get(s.duplicate_of or name)
            if full is None or tuple(full.shape) != tuple(s.full_shape):
                raise CheckpointError(
                    f"{source}: parameter '{name}' is missing or has another shape; the checkpoint comes "
                    f"from another model (drop model.* overrides)"
                )
            p.copy_(s.take(full))


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json")) or os.path.isfile(
        os.path.join(path, "state.json")
    )


def resolve(path: str, overrides: list[str] = ()) -> ModelSource:
    """MODEL as a dtrain checkpoint folder or a Hugging Face folder, with `overrides` (key=value) on its
    config; everything is checked before a weight is read. Raises ConfigError/CheckpointError."""
    from dtrain import checkpoint
    from dtrain.config import config_from_dict, load_config, to_dict
    from dtrain.hf import CONFIG, check_init_from

    if os.path.isdir(path) and is_checkpoint(path):
        checkpoint.verify(path)
        saved = to_dict(config_from_dict(checkpoint.load_state(path)["config"]))
        # The layout is the command's, not the one that trained: parallel.* starts from the defaults, and
        # the run's data and output folders are not this command's either.
        for section in ("parallel", "data", "run"):
            saved.pop(section, None)
        cfg = _with_overrides(saved, overrides)
        tokenizer, eos = tokenizer_of(cfg.model)
        # The weights are the checkpoint's: the folder it started from is not read again.
        cfg.model.init_from = None
        return ModelSource(path, "checkpoint", cfg, tokenizer, eos)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG)):
        cfg = load_config(None, [f"model.init_from={path}", *overrides])
        check_init_from(cfg.model)
        return ModelSource(path, "hf", cfg, _hf_tokenizer(path), _eos_ids(path))
    hint = ""
    if os.path.isdir(path) and checkpoint.list_checkpoints(path):
        hint = f"; did you mean {checkpoint.list_checkpoints(path)[-1]}?"
    what = "is not a folder" if not os.path.isdir(path) else "holds neither manifest.json nor config.json"
    raise ConfigError(
        f"MODEL {path} {what}: give a dtrain checkpoint folder (runs/NAME/checkpoints/step_N) or a Hugging "
        f"Face model folder (config.json and safetensors){hint}"
    )


def tokenizer_of(m) -> tuple[_Tokenizer | None, frozenset[int]]:
    """The tokenizer and end-of-sequence ids of a model config: its model.init_from folder's, or UTF-8
    bytes for a byte-level model (256 ids, no folder)."""
    folder = m.init_from
    if folder and os.path.isdir(folder):
        return _hf_tokenizer(folder), _eos_ids(folder)
    return (_byte_tokenizer() if not folder and m.vocab_size == 256 else None), frozenset()


def _with_overrides(saved: dict, overrides: list[str]) -> Config:
    from omegaconf import OmegaConf

    from dtrain.config import config_from_dict

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example parallel.tp=2)")
    if not overrides:
        return config_from_dict(saved)
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    return config_from_dict(OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(saved), given)))


def generation_device() -> tuple[torch.device, str]:
    """One GPU when there is one (bf16), else the CPU (fp32): the device and the precision the model's
    parameters are stored in there."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), "bf16"
    return torch.device("cpu"), "fp32"


# --- decoding -------------------------------------------------------------------------------------------


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0:  # also NaN
        raise ConfigError(f"--temperature {temperature} must be >= 0 (0 decodes greedily)")
    if top_k < 0:
        raise ConfigError(f"--top-k {top_k} must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p} must be in (0, 1] (1 keeps every token)")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")


def top_k_keep(probs: torch.Tensor, k: int) -> torch.Tensor:
    """True for exactly the k most likely tokens of each row (ties broken towards the lower id); all
    True for k = 0 or k >= vocabulary."""
    if k == 0 or k >= probs.shape[-1]:
        return torch.ones_like(probs, dtype=torch.bool)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, True)


def top_p_keep(probs: torch.Tensor, p: float) -> torch.Tensor:
    """True for the smallest prefix of each row's tokens sorted by falling probability (ties towards the
    lower id) whose probability mass reaches p: a token is kept while the mass before it is below p."""
    if p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before < p)


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from (temperature > 0): softmax(z / T), restricted to top-k,
    then to top-p, renormalised. fp32 or wider."""
    from parallel.precision import wide

    probs = torch.softmax(wide(logits) / temperature, dim=-1)
    probs = probs * top_k_keep(probs, top_k)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = probs * top_p_keep(probs, top_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) next token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: frozenset[int] = frozenset(),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """The new ids of every prompt (batched, left-padded, KV-cached); each row ends at an id of
    `eos_ids` (included), after max_new_tokens, or at model.max_seq_len tokens in all. The model computes
    in its parameters' dtype (`in_precision`); sampling widens the logits to fp32."""
    device = next(model.parameters()).device
    max_seq_len = model.cfg.max_seq_len
    lengths = [len(p) for p in prompts]
    limits = [min(max_new_tokens, max_seq_len - n) for n in lengths]
    width = max(lengths)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt) :] = True
    out: list[list[int]] = [[] for _ in prompts]
    done = [limit <= 0 for limit in limits]
    if all(done):
        return out
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(width + max(limits))
    logits = model(tokens.to(device), cache=cache.feed(valid.to(device)))[:, -1]
    while True:
        chosen = pick(logits, temperature, top_k, top_p, generator)
        for row, token in enumerate(chosen.tolist()):
            if done[row]:
                continue
            out[row].append(token)
            done[row] = token in eos_ids or len(out[row]) >= limits[row]
        if all(done):
            return out
        # Rows that ended are fed as padding: their positions no longer grow and nothing sees them.
        live = torch.tensor([not d for d in done], device=device)[:, None]
        logits = model(chosen[:, None], cache=cache.feed(live))[:, -1]


# --- the command ------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # as given, or decoded from ids where there is a tokenizer


def _parse_ids(spec, where: str) -> list[int]:
    if isinstance(spec, str):
        try:
            return [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{where} {spec!r}: give comma-separated token ids, e.g. 1,2,3") from None
    if isinstance(spec, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return spec
    raise ConfigError(f"{where}: prompt_ids must be a list of integers, e.g. [1, 2, 3]")


def read_prompts(source: ModelSource, texts, ids, file) -> list[Prompt]:
    """The prompts of --prompt (text), --prompt-ids or --prompts FILE.jsonl (one object a line, with
    "prompt" text or "prompt_ids"), tokenized and checked against the model: ids inside the vocabulary,
    at most model.max_seq_len tokens, none empty."""
    given: list[tuple[str, str | list[int], str]] = []  # (kind, value, where)
    for n, text in enumerate(texts or [], 1):
        given.append(("text", text, f"--prompt {n}"))
    for n, spec in enumerate(ids or [], 1):
        given.append(("ids", _parse_ids(spec, "--prompt-ids"), f"--prompt-ids {n}"))
    if file is not None:
        if not os.path.isfile(file):
            raise ConfigError(f"--prompts {file} does not exist; give a JSON-lines file")
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file} line {n}"
                try:
                    item = json.loads(line)
                except ValueError:
                    raise ConfigError(
                        f"{where} is not JSON; write one object a line, e.g. " + '{"prompt": "Hi"}'
                    ) from None
                if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                    given.append(("text", item["prompt"], where))
                elif isinstance(item, dict) and "prompt_ids" in item:
                    given.append(("ids", _parse_ids(item["prompt_ids"], where), where))
                else:
                    raise ConfigError(f'{where}: give {{"prompt": "text"}} or {{"prompt_ids": [1, 2, 3]}}')
    if not given:
        raise ConfigError("no prompt: give --prompt TEXT, --prompt-ids 1,2,3 or --prompts FILE.jsonl")
    m, tok = source.cfg.model, source.tokenizer
    prompts = []
    for kind, value, where in given:
        if kind == "text":
            if tok is None:
                raise ConfigError(
                    f"{where}: {source.path} has no tokenizer (tokenizer.json) to encode text; "
                    "give --prompt-ids"
                )
            prompt = Prompt(tok.encode(value), value)
        else:
            prompt = Prompt(value, None)
            bad = [i for i in value if not 0 <= i < m.vocab_size]
            if bad:
                raise ConfigError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {m.vocab_size})")
            if tok is not None:
                prompt.text = tok.decode(value)
        if not prompt.ids:
            raise ConfigError(f"{where} is empty (no tokens); give at least one token")
        if len(prompt.ids) > m.max_seq_len:
            raise ConfigError(
                f"{where} has {len(prompt.ids)} tokens, more than model.max_seq_len={m.max_seq_len}; "
                "shorten it"
            )
        prompts.append(prompt)
    return prompts


def command(args) -> None:
    """dtrain generate: check the options, the model folder and the prompts, then load and decode."""
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    source = resolve(args.model)
    if source.cfg.model.moe.num_experts:
        raise ConfigError(
            f"{args.model} is a mixture-of-experts model: dtrain generates with dense models only (expert "
            f"capacity would depend on the batch)"
        )
    prompts = read_prompts(source, args.prompt, args.prompt_ids, args.prompts)
    device, precision = generation_device()
    model = source.build(device, precision)
    outputs = generate(
        model,
        [p.ids for p in prompts],
        args.max_new_tokens,
        source.eos_ids,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
    )
    tok = source.tokenizer
    for n, (prompt, ids) in enumerate(zip(prompts, outputs, strict=True)):
        text = tok.decode(ids) if tok is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": prompt.ids, "ids": ids, "text": text}, ensure_ascii=False))
        elif text is not None:
            print(("\n" if n else "") + (prompt.text or "") + text, flush=True)
        else:
            print(f"{','.join(map(str, prompt.ids))} -> {','.join(map(str, ids))}", flush=True)


# --- samples during training ------------------------------------------------------------------------------


def check_sample_prompt(cfg: Config) -> list[int]:
    """train.sample_prompt's ids, checked before any process starts: a tokenizer to encode it, and room
    for at least one new token within model.max_seq_len."""
    m, t = cfg.model, cfg.train
    tokenizer, _ = tokenizer_of(m)
    if tokenizer is None:
        raise ConfigError(
            "train.sample_every needs a tokenizer: a byte-level model (model.vocab_size=256) or a "
            "model.init_from folder with tokenizer.json; set train.sample_every=0"
        )
    ids = tokenizer.encode(t.sample_prompt)
    if not 0 < len(ids) < m.max_seq_len:
        raise ConfigError(
            f"train.sample_prompt is {len(ids)} tokens; it needs between 1 and model.max_seq_len - 1 = "
            f"{m.max_seq_len - 1}"
        )
    return ids


def sample_text(cfg: Config, state: dict[str, torch.Tensor], device: torch.device, step: int) -> str:
    """The continuation of train.sample_prompt by the whole model with canonical weights `state`."""
    t = cfg.train
    tokenizer, eos = tokenizer_of(cfg.model)
    with torch.random.fork_rng(devices=[]):  # building a model draws initial weights: leave training's RNG
        model = Transformer(cfg.model)
    copy_canonical(state, [model], "the trained weights")
    in_precision(model.to(device).eval(), t.precision)  # the run's compute dtype, as it trains
    ids = generate(model, [check_sample_prompt(cfg)], t.sample_tokens, eos, 1.0, 0, 1.0, t.seed + step)
    return tokenizer.decode(ids[0])

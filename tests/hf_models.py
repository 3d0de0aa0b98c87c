"""Small random Hugging Face models of every supported family, made locally with transformers (the
reference none of us wrote) and saved as the folders users start from."""

from __future__ import annotations

import os

import torch

COMMON = {
    "vocab_size": 97,  # odd: the vocabulary is padded over tensor ranks
    "hidden_size": 48,
    "intermediate_size": 72,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so positions 0..31 reach the scaled band
}
FAMILIES = {
    "llama-tied-llama3-rope": (
        "llama",
        {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE, "rope_theta": 5e5},
    ),
    "llama-mha-untied": ("llama", {"num_key_value_heads": 4}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-biases-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qk-norm-head-dim": ("qwen3", {"head_dim": 16}),  # head_dim != hidden / heads = 12
}


def make(folder: str, family: str, max_shard_size: str | None = None, noise: float = 0.05) -> str:
    """Save a randomly initialised model of `family` to `folder`; every weight (biases and norm gains
    included) gets Gaussian noise of standard deviation `noise`, so that none is a trivial zero or one (a
    larger `noise` gives greedy decoding more varied continuations than a near-uniform model's)."""
    import transformers

    model_type, extra = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra})
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    os.makedirs(folder, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def reference_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits for `tokens` from the saved folder, in fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits


# A chat template in the style of the Hub's: special tokens as variables, turns closed by an end-of-turn
# token, a generation prompt, and refusals through raise_exception for conversations it cannot render.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('a conversation starts with a system or user message') }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["cab", "bad", "fed", "dig", "hog", "kale", "lime", "jade", "mace", "nod", "once", "fig", "hem"]


def sample_text(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tokenizer(folder: str, vocab_size: int = 90) -> str:
    """Train a small BPE tokenizer on generated words with the `tokenizers` library and save it as a
    Hugging Face tokenizer folder: tokenizer.json (a BOS-adding post-processor) and tokenizer_config.json
    with the special tokens and CHAT_TEMPLATE."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator([sample_text(50, i) + "\n" for i in range(200)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder

"""`dtrain prepare-data`: text, jsonl, prompt/response and chat records into a folder of token files.

A prepared folder holds, per split (train, and val unless --val-fraction is 0):

    {split}.npy        the tokens, flat (uint16, or uint32 for vocabularies past 65,536 ids)
    {split}.docs.npy   document start offsets into it, plus the end (int64), for every format but text
    {split}.mask.npy   1 where a token is learned (uint8), for prompt-response and chat
    manifest.json      what it holds: format, tokenizer, eos id, vocabulary, and per split the documents,
                       tokens, target tokens and UTF-8 bytes (for validation bits per byte); written last

Without --tokenizer tokens are bytes (0..255); documents then end with id 256 (a vocabulary of 257).
With one, ids are what the folder's fast tokenizer gives (dtrain.tokenizer). Every record is read and
checked before anything is written, so bad input leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from dtrain.data_files import MANIFEST, DataError
from dtrain.tokenizer import Tokenizer, TokenizerError

FORMATS = ("text", "jsonl", "prompt-response", "chat")
BYTE_EOS = 256  # byte-level documents end with the first id past the bytes


class _Doc:
    __slots__ = ("ids", "learned", "n_bytes")

    def __init__(self, ids: list[int], learned: list[int] | None, n_bytes: int):
        self.ids, self.learned, self.n_bytes = ids, learned, n_bytes


def _records(path: str, fmt: str):
    """(line number, JSON object) per non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); --format {fmt} reads "
                    f"one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(record).__name__}, not an object")
            yield lineno, record


def _field(record: dict, key: str, where: str, fmt: str, example: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        got = "no" if value is None else f"a non-string ({type(value).__name__})"
        raise DataError(f"{where}: {got} {key!r} field; --format {fmt} reads lines like {example}")
    return value


def _encode(tok: Tokenizer | None, text: str, special: bool) -> list[int]:
    return tok.encode(text, add_special_tokens=special) if tok else list(text.encode("utf-8"))


def _text_doc(tok, record, where) -> _Doc:
    text = _field(record, "text", where, "jsonl", '{"text": "..."}')
    if not text:
        raise DataError(f"{where}: the text is empty, so the record has no learned tokens")
    return _Doc([*_encode(tok, text, True), _eos(tok)], None, len(text.encode("utf-8")))


def _prompt_response_doc(tok, record, where) -> _Doc:
    example = '{"prompt": "...", "response": "..."}'
    prompt = _field(record, "prompt", where, "prompt-response", example)
    response = _field(record, "response", where, "prompt-response", example)
    # As a fine-tuning script writes it with transformers: the prompt with the special tokens the
    # tokenizer adds (BOS), the response without, then end of sequence; labels -100 on the prompt.
    p, r = _encode(tok, prompt, True), _encode(tok, response, False)
    if not r:
        raise DataError(f"{where}: the response is empty, so the record has no learned tokens")
    ids = [*p, *r, _eos(tok)]
    return _Doc(ids, [0] * len(p) + [1] * (len(r) + 1), len((prompt + response).encode("utf-8")))


def _chat_doc(tok: Tokenizer, record, where) -> _Doc:
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DataError(
            f'{where}: --format chat reads lines like {{"messages": [{{"role": "user", "content": "..."}}, '
            f"...]}}: a list of messages, each with a string role and content"
        )
    try:
        text = tok.render_chat(messages)
        # An assistant turn, with its end-of-turn marker, is what rendering one more message adds to
        # the conversation so far rendered with the generation prompt (the assistant header).
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.render_chat(messages[:i], add_generation_prompt=True)
            upto = tok.render_chat(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError(
                    f"{where}: the chat template renders earlier turns differently once a turn is added, "
                    f"so the assistant turns cannot be located; use a template that renders turn by turn"
                )
            spans.append((len(before), len(upto)))
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    if not spans:
        raise DataError(f"{where}: no assistant message, so the conversation has no learned tokens")
    ids, offsets = tok.encode_with_offsets(text, add_special_tokens=False)
    learned = [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
    if not any(learned):
        raise DataError(f"{where}: the assistant turns render to no tokens, so nothing is learned")
    if ids[-1] != tok.eos_id:
        ids.append(tok.eos_id)
        learned.append(learned[-1])  # the end of sequence is learned after a final assistant turn
    return _Doc(ids, learned, len(text.encode("utf-8")))


def _eos(tok: Tokenizer | None) -> int:
    return tok.eos_id if tok else BYTE_EOS


def _write_split(out_dir: str, split: str, docs: list[_Doc], dtype: str, masks: bool, index: bool) -> dict:
    ids = np.fromiter((i for d in docs for i in d.ids), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(d.ids) for d in docs])]).astype(np.int64)
    _write_npy_atomic(os.path.join(out_dir, f"{split}.npy"), ids.astype(dtype))
    if index:  # tokenised text stays one stream per split, read in windows (data.MemmapData)
        _write_npy_atomic(os.path.join(out_dir, f"{split}.docs.npy"), offsets)
    if masks:
        learned = np.fromiter((x for d in docs for x in d.learned), dtype=np.uint8)
        _write_npy_atomic(os.path.join(out_dir, f"{split}.mask.npy"), learned)
        targets = sum(sum(d.learned[1:]) for d in docs)
    else:
        targets = sum(len(d.ids) - 1 for d in docs)
    return {
        "documents": len(docs),
        "tokens": len(ids),
        "targets": int(targets),
        "bytes": sum(d.n_bytes for d in docs),
    }


def _clear(out_dir: str) -> None:
    """A folder prepared before holds files of another format: remove them so none is read with the new
    ones (the manifest first, so a crash in between leaves no folder that claims to be complete)."""
    for name in [MANIFEST] + [
        f"{s}{x}" for s in ("train", "val") for x in (".npy", ".docs.npy", ".mask.npy")
    ]:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.unlink(path)


def _write_manifest(out_dir: str, manifest: dict) -> None:
    tmp = os.path.join(out_dir, f".tmp-{MANIFEST}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def _dtype(requested: str | None, vocab_size: int) -> str:
    if requested not in (None, "uint16", "uint32"):
        raise DataError(f"dtype={requested!r} is not valid; choose uint16 or uint32")
    if requested == "uint16" and vocab_size > 2**16:
        raise DataError(f"the tokenizer has {vocab_size:,} ids, more than uint16 holds; use --dtype uint32")
    return requested or ("uint16" if vocab_size <= 2**16 else "uint32")


def prepare_data(
    input_path: str,
    out_dir: str,
    fmt: str = "text",
    tokenizer: str | None = None,
    val_fraction: float = 0.1,
    dtype: str | None = None,
) -> dict:
    """Tokenise `input_path` in format `fmt` into `out_dir` (see the module docstring); returns the
    manifest. The last `val_fraction` of the documents (of the text, for format text) is validation."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is not valid; choose one of {', '.join(FORMATS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not os.path.isfile(input_path):
        raise DataError(f"input file {input_path!r} does not exist")
    tok = None
    if tokenizer is not None:
        try:
            tok = Tokenizer(tokenizer)
        except TokenizerError as e:
            raise DataError(str(e)) from None
    if fmt == "chat" and (tok is None or tok.chat_template is None):
        raise DataError(
            "--format chat needs --tokenizer FOLDER whose tokenizer_config.json has a chat_template"
        )
    name = os.path.abspath(tokenizer) if tokenizer else "byte-level"
    if fmt == "text" and tok is None:
        info = prepare_text(input_path, out_dir, val_fraction, _dtype(dtype, 256))
        splits = {"train": info["train_tokens"], "val": info["val_tokens"]}
        manifest = {"format": "text", "tokenizer": name, "eos_id": None, "vocab_size": 256, "masks": False}
        manifest["splits"] = {
            s: {"documents": None, "tokens": n, "targets": n, "bytes": n} for s, n in splits.items() if n
        }
        _write_manifest(out_dir, manifest)
        return {**manifest, "out_dir": out_dir}
    if fmt == "text":
        try:
            with open(input_path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(
                f"input file {input_path!r} is not UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        if not text:
            raise DataError(f"input file {input_path!r} is empty")
        cut = len(text) - int(len(text) * val_fraction)
        docs, val_docs = [
            [_Doc([*tok.encode(part, True), tok.eos_id], None, len(part.encode("utf-8")))] if part else []
            for part in (text[:cut], text[cut:])
        ]
    else:
        make = {"jsonl": _text_doc, "prompt-response": _prompt_response_doc, "chat": _chat_doc}[fmt]
        docs = [make(tok, record, f"{input_path}:{n}") for n, record in _records(input_path, fmt)]
        if not docs:
            raise DataError(f"input file {input_path!r} holds no records")
        n_val = int(len(docs) * val_fraction)
        docs, val_docs = docs[: len(docs) - n_val], docs[len(docs) - n_val :]
    vocab = tok.vocab_size if tok else BYTE_EOS + 1
    dtype = _dtype(dtype, vocab)
    masks = fmt in ("prompt-response", "chat")
    os.makedirs(out_dir, exist_ok=True)
    _clear(out_dir)
    manifest = {
        "format": fmt,
        "tokenizer": name,
        "eos_id": _eos(tok),
        "vocab_size": vocab,
        "dtype": dtype,
        "masks": masks,
        "splits": {"train": _write_split(out_dir, "train", docs, dtype, masks, fmt != "text")},
    }
    if val_docs:
        manifest["splits"]["val"] = _write_split(out_dir, "val", val_docs, dtype, masks, fmt != "text")
    _write_manifest(out_dir, manifest)
    return {**manifest, "out_dir": out_dir}


def _write_npy_atomic(path: str, array: np.ndarray) -> None:
    # A crash mid-write must never leave a truncated train.npy that a later run would happily map.
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare_text(text_path: str, out_dir: str, val_fraction: float = 0.1, dtype: str = "uint16") -> dict:
    """Byte-level tokenisation of a file into out_dir/train.npy and out_dir/val.npy (the last val_fraction).

    Each byte is one token (0..255), so any file works and vocab_size=256 always suffices. With
    val_fraction so small that no byte is left for validation, no val.npy is written (a stale one is removed,
    so build_dataset never pairs a new train split with an old validation split).
    """
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"dtype={dtype!r} is not valid; choose uint16 or uint32")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not os.path.isfile(text_path):
        raise DataError(f"input file {text_path!r} does not exist")
    data = np.fromfile(text_path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"input file {text_path!r} is empty")
    n_val = int(data.size * val_fraction)
    if n_val == data.size:  # only reachable by float rounding; keep at least one training token
        n_val -= 1
    tokens = data.astype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    _write_npy_atomic(os.path.join(out_dir, "train.npy"), tokens[: data.size - n_val])
    val_path = os.path.join(out_dir, "val.npy")
    if n_val:
        _write_npy_atomic(val_path, tokens[data.size - n_val :])
    elif os.path.exists(val_path):
        os.unlink(val_path)
    return {"train_tokens": data.size - n_val, "val_tokens": n_val, "vocab_size": 256, "out_dir": out_dir}

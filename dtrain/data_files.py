"""What every dataset reads with: the error a run cannot use its data with, the seeds of its random
streams, and prepared folders' token files and manifest."""

from __future__ import annotations

import json
import os

import numpy as np


class DataError(ValueError):
    """Data the run cannot use; the one-line message says what to change."""


def seed_words(*values: int) -> list[int]:
    # Two 32-bit words per value: numpy's SeedSequence zero-pads short keys and splits big ints into a
    # variable number of words, so a fixed-width encoding is what keeps distinct keys from colliding.
    words = []
    for v in values:
        v %= 2**64  # negative seeds are valid config values
        words += [v & 0xFFFFFFFF, v >> 32]
    return words


# Purpose tags, so the chain, the samples and the epoch orders never share a random stream.
CHAIN, SAMPLE, EPOCH, MIX = 1, 2, 3, 4

MANIFEST = "manifest.json"  # what a prepared folder holds (prepare_data)


def load_tokens(path: str) -> np.ndarray:
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"data file {path!r} must be a 1-D integer array; re-run `dtrain prepare-data`")
    return tokens


def check_ids(tokens: np.ndarray, vocab_size: int, path: str, chunk: int = 1 << 24) -> None:
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        high, low = part.max(), part.min()
        if high >= vocab_size or low < 0:
            bad = int(high) if high >= vocab_size else int(low)
            at = start + int(np.argmax(part == bad))
            raise DataError(
                f"data file {path!r} holds token id {bad} at position {at}, outside "
                f"[0, model.vocab_size={vocab_size}); raise model.vocab_size or re-tokenize"
            )


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)

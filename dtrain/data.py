"""Token data: a learnable synthetic stream and windows over a memory-mapped .npy token file; which
dataset a config reads (documents and mixtures: dtrain/documents.py), and each rank's micro-batches of it.

The equivalence contract (docs/design.md) needs the global batch of step `s` to be a function of (seed, s)
only, so every dataset here is stateless: `batch(step, start, count)` returns rows `start .. start+count-1` of
that global batch, and a row is the same whichever window it is requested in. Resuming is then a matter of
knowing the step, and each data-parallel rank materialises only its own rows.
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import torch

from dtrain.data_files import (
    CHAIN,
    EPOCH,
    SAMPLE,
    DataError,
    check_ids,
    seed_words,
)
from dtrain.documents import DocumentData, MixtureData, document_microbatches


class SyntheticData:
    """Learnable synthetic token stream: a fixed sparse Markov chain drawn from the seed.

    Every token has `k = min(4, vocab_size)` distinct successors, chosen at random per token but with the
    same weights (8:4:2:1); with probability `SMOOTHING` the next token is instead uniform over the whole
    vocabulary, so every token can follow every other and every id shows up. Because each row of the
    transition matrix is a permutation of the same distribution, the conditional entropy of the next token
    is the same whatever the current one, and that constant is the exact floor of the per-token
    cross-entropy: `entropy_floor` (nats), about 1.32 for vocab_size=256 against log(256) = 5.55. A model
    only has to learn the bigram table to get there, so loss falls well below log(vocab_size) quickly.
    """

    WEIGHTS = (8.0, 4.0, 2.0, 1.0)
    SMOOTHING = 0.02

    def __init__(self, vocab_size: int, seq_len: int, seed: int, split: str = "train"):
        if vocab_size < 1:
            raise DataError(f"model.vocab_size={vocab_size} must be positive")
        if seq_len < 1:
            raise DataError(f"train.seq_len={seq_len} must be positive")
        self.vocab_size, self.seq_len, self.seed, self.split = vocab_size, seq_len, seed, split
        # crc32, not hash(): it must agree across processes and Python versions.
        self._split_tag = zlib.crc32(split.encode())
        V = vocab_size
        k = min(len(self.WEIGHTS), V)
        w = np.array(self.WEIGHTS[:k]) / sum(self.WEIGHTS[:k])
        # The chain depends on the seed but not on the split: validation data comes from the same process.
        rng = np.random.default_rng(seed_words(CHAIN, seed))
        succ = rng.integers(0, V, size=(V, k))
        while True:  # redraw rows with a repeated successor: the floor below assumes k distinct successors
            srt = np.sort(succ, axis=1)
            bad = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if not bad.any():
                break
            succ[bad] = rng.integers(0, V, size=(int(bad.sum()), k))
        # Outcome j < k: take successor j; outcome k: a uniform token. Cumulative bounds for searchsorted.
        self._cdf = np.cumsum(np.append((1 - self.SMOOTHING) * w, self.SMOOTHING))[:-1]
        self._k = k
        # One flat lookup table serves both outcomes: index x*k + j is successor j of x, and V*k + u is
        # token u itself; the walk is then one gather per position (see batch()).
        self._table = np.concatenate([succ.reshape(-1), np.arange(V)]).astype(np.int64)
        q = self.SMOOTHING / V
        p = (1 - self.SMOOTHING) * w + q
        self.entropy_floor = float(-(p * np.log(p)).sum() - (V - k) * q * math.log(q))

    def batch(self, step: int, start: int, count: int) -> torch.Tensor:
        """int64 (count, seq_len + 1): rows `start .. start+count-1` of the global batch of `step`."""
        if step < 0 or start < 0 or count < 0:
            raise DataError(f"batch(step={step}, start={start}, count={count}) needs non-negative arguments")
        V, L, k = self.vocab_size, self.seq_len, self._k
        # One generator per sample, so a row never depends on which other rows are drawn with it.
        u = np.empty((count, 2 * L + 1))
        for i in range(count):
            key = seed_words(SAMPLE, self.seed, self._split_tag, step, start + i)
            u[i] = np.random.default_rng(key).random(2 * L + 1)
        first = np.minimum((u[:, 0] * V).astype(np.int64), V - 1)
        choice = np.searchsorted(self._cdf, u[:, 1 : L + 1].T, side="right")  # (L, count), outcome 0..k
        uniform = np.minimum((u[:, L + 1 :].T * V).astype(np.int64), V - 1)
        # table index = x * mul + add: mul=k, add=j for a successor; mul=0, add=V*k+u for a uniform token.
        is_uniform = choice == k
        mul = np.where(is_uniform, 0, k)
        add = np.where(is_uniform, V * k + uniform, choice)
        out = np.empty((L + 1, count), dtype=np.int64)  # position-major: each step of the walk is contiguous
        out[0] = first
        table = self._table
        for t in range(L):  # the walk is sequential in t; everything else above is vectorised
            out[t + 1] = table[out[t] * mul[t] + add[t]]
        return torch.from_numpy(np.ascontiguousarray(out.T))


class MemmapData:
    """Windows of seq_len+1 tokens over a flat 1-D .npy token file (any integer dtype, normally uint16/32).

    Window w is tokens [w*seq_len, w*seq_len + seq_len + 1): the inputs of consecutive windows do not
    overlap and neighbours share only the boundary token, so every token after the first is a target exactly
    once per epoch. Global sample n = step * global_batch_size + index is window perm_e[n % num_windows],
    with e = n // num_windows and perm_e a permutation drawn from (seed, e): deterministic and resumable from
    the step alone. The file is only mapped, never read whole; token ids are checked per batch (cheap).
    """

    def __init__(self, path: str, seq_len: int, global_batch_size: int, seed: int, vocab_size: int):
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist; create it with `dtrain prepare-data`")
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # numpy would say "pickled data" and suggest allow_pickle=True: never
            raise DataError(
                f"data file {path!r} is not a .npy array (no NUMPY header); write token files with "
                f"`dtrain prepare-data` or np.save of a 1-D uint16/uint32 array"
            )
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy's messages for a broken .npy file are multi-line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "object" in first.lower() or "pickle" in first.lower():
                first = "it holds Python objects, which dtrain never unpickles"
            raise DataError(f"data file {path!r} is not a .npy array dtrain can read: {first}") from None
        if not isinstance(tokens, np.ndarray) or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"data file {path!r} has dtype {tokens.dtype}; token files must be uint16/uint32")
        if tokens.ndim != 1:
            raise DataError(f"data file {path!r} has shape {tokens.shape}; token files must be 1-D (flatten)")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"data file {path!r} holds {len(tokens)} tokens, fewer than train.seq_len+1={seq_len + 1}; "
                f"lower train.seq_len or use more data"
            )
        self.path, self.tokens, self.seq_len = path, tokens, seq_len
        self.global_batch_size, self.seed, self.vocab_size = global_batch_size, seed, vocab_size
        self.num_windows = (len(tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}  # at most two epochs: a batch can straddle a boundary

    def check_token_ids(self) -> None:
        """Every token id in the file lies in [0, vocab_size): read once, in chunks, at start-up, so a
        bad file fails before any process group exists or anything is written (batch() checks again as
        it reads). Skipped when the dtype cannot hold a bad id (uint8 data and a 256-token vocabulary)."""
        check_ids(self.tokens, self.vocab_size, self.path)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            dtype = np.int32 if self.num_windows < 2**31 else np.int64  # halves memory on huge files
            perm = np.arange(self.num_windows, dtype=dtype)
            np.random.default_rng(seed_words(EPOCH, self.seed, epoch)).shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def window_ids(self, step: int, start: int, count: int) -> np.ndarray:
        """Which windows rows `start .. start+count-1` of step `step` are (exposed for tests and tools)."""
        if step < 0 or start < 0 or count < 0 or start + count > self.global_batch_size:
            raise DataError(
                f"batch(step={step}, start={start}, count={count}) is outside the global batch of "
                f"train.global_batch_size={self.global_batch_size}"
            )
        n = step * self.global_batch_size + start + np.arange(count, dtype=np.int64)
        epochs, pos = np.divmod(n, self.num_windows)
        return np.array([self._perm(int(e))[p] for e, p in zip(epochs, pos, strict=True)], dtype=np.int64)

    def batch(self, step: int, start: int, count: int) -> torch.Tensor:
        """int64 (count, seq_len + 1): rows `start .. start+count-1` of the global batch of `step`."""
        L = self.seq_len
        rows = [self.tokens[w * L : w * L + L + 1] for w in self.window_ids(step, start, count)]
        out = np.stack(rows).astype(np.int64) if rows else np.empty((0, L + 1), dtype=np.int64)
        if out.size and out.max() >= self.vocab_size:
            raise DataError(
                f"data.path={self.path!r} holds token id {out.max()} >= model.vocab_size={self.vocab_size}; "
                f"raise model.vocab_size or re-tokenize"
            )
        if out.size and out.min() < 0:
            raise DataError(f"data.path={self.path!r} holds negative token id {out.min()}; re-tokenize")
        return torch.from_numpy(out)


def packs_documents(cfg) -> bool:
    """Whether the training data are packed documents (a prepared folder with document offsets)."""
    d = cfg.data
    folders = [source.path for source in d.mix] if d.mix else [d.path] if d.kind == "memmap" else []
    return any(folder and os.path.exists(os.path.join(folder, "train.docs.npy")) for folder in folders)


def build_dataset(cfg, split: str = "train", path: str | None = None):
    """The dataset for `split`, or None when a memmap source has no such split (no val.npy, or data.path is
    a single file: only folders carry a validation split)."""
    m, t = cfg.model, cfg.train
    if cfg.data.mix and path is None:
        sources = [build_dataset(cfg, split, source.path) for source in cfg.data.mix]
        kept = [(s, source.weight) for s, source in zip(sources, cfg.data.mix, strict=True) if s is not None]
        if not kept:
            return None
        return MixtureData([s for s, _ in kept], [w for _, w in kept], t.seed, t.global_batch_size, t.seq_len)
    if cfg.data.kind == "synthetic" and path is None:
        return SyntheticData(m.vocab_size, t.seq_len, t.seed, split)
    if cfg.data.kind != "memmap" and path is None:
        raise DataError(f"data.kind={cfg.data.kind!r} is not valid; choose synthetic or memmap")
    path = path or cfg.data.path
    if path is None:
        raise DataError("data.kind=memmap needs data.path (a .npy file or a folder holding train.npy)")
    if os.path.isdir(path):
        file = os.path.join(path, f"{split}.npy")
        if split != "train" and not os.path.exists(file):
            return None
        if os.path.exists(os.path.join(path, f"{split}.docs.npy")):
            return DocumentData(
                path, split, t.seq_len, t.global_batch_size, t.seed, m.vocab_size, cfg.data.packing
            )
    elif os.path.exists(path):
        if split != "train":
            return None
        file = path
    else:
        raise DataError(f"data.path={path!r} does not exist; create it with `dtrain prepare-data`")
    return MemmapData(file, t.seq_len, t.global_batch_size, t.seed, m.vocab_size)


def check_data(cfg) -> None:
    """Open every split the run will read and check its token ids, before any process group exists:
    a missing, malformed or out-of-vocabulary data file fails here in one line."""
    for split in ("train", "val"):
        dataset = build_dataset(cfg, split)
        if isinstance(dataset, MemmapData | DocumentData | MixtureData):
            dataset.check_token_ids()


def global_target_tokens(dataset, step: int, global_batch_size: int) -> int:
    """Target tokens in the global batch of `step`: the loss denominator, the same on every rank."""
    if getattr(dataset, "documents", False):
        return dataset.target_tokens(step)
    return global_batch_size * dataset.seq_len


def rank_microbatches(
    dataset, step: int, dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int
) -> list[tuple]:
    """This data-parallel rank's rows of the global batch of `step`, cut into (inputs, targets) micro-batches,
    or (inputs, targets, {"positions", "doc_ids"}) for documents (targets -100 where nothing is learned).

    Rank r owns the contiguous rows [r*per_rank, (r+1)*per_rank) and only materialises those, so
    concatenating every rank's micro-batches in rank order gives back the global batch exactly.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank} is not a rank of a data-parallel group of size {dp_size}")
    per_rank = global_batch_size // dp_size
    if micro_batch_size < 1 or per_rank * dp_size != global_batch_size or per_rank % micro_batch_size:
        raise DataError(
            f"train.global_batch_size={global_batch_size} must be a multiple of "
            f"parallel.dp*train.micro_batch_size={dp_size * micro_batch_size}"
        )
    if getattr(dataset, "documents", False):
        return document_microbatches(dataset.rows(step, dp_rank * per_rank, per_rank), micro_batch_size)
    tokens = dataset.batch(step, dp_rank * per_rank, per_rank)
    out = []
    for i in range(0, per_rank, micro_batch_size):
        mb = tokens[i : i + micro_batch_size]
        out.append((mb[:, :-1].contiguous(), mb[:, 1:].contiguous()))
    return out

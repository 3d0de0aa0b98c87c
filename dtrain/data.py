"""Token data: a learnable synthetic stream and windows over a memory-mapped .npy token file.

The equivalence contract (docs/design.md) needs the global batch of step `s` to be a function of (seed, s)
only, so every dataset here is stateless: `batch(step, start, count)` returns rows `start .. start+count-1` of
that global batch, and a row is the same whichever window it is requested in. Resuming is then a matter of
knowing the step, and each data-parallel rank materialises only its own rows.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib

import numpy as np
import torch


class DataError(ValueError):
    """Data the run cannot use; the one-line message says what to change."""


def _seed_words(*values: int) -> list[int]:
    # Two 32-bit words per value: numpy's SeedSequence zero-pads short keys and splits big ints into a
    # variable number of words, so a fixed-width encoding is what keeps distinct keys from colliding.
    words = []
    for v in values:
        v %= 2**64  # negative seeds are valid config values
        words += [v & 0xFFFFFFFF, v >> 32]
    return words


# Purpose tags, so the chain, the samples and the epoch orders never share a random stream.
_CHAIN, _SAMPLE, _EPOCH = 1, 2, 3


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
        rng = np.random.default_rng(_seed_words(_CHAIN, seed))
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
            key = _seed_words(_SAMPLE, self.seed, self._split_tag, step, start + i)
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

    def check_token_ids(self, chunk: int = 1 << 24) -> None:
        """Every token id in the file lies in [0, vocab_size): read once, in chunks, at start-up, so a
        bad file fails before any process group exists or anything is written (batch() checks again as
        it reads). Skipped when the dtype cannot hold a bad id (uint8 data and a 256-token vocabulary)."""
        info = np.iinfo(self.tokens.dtype)
        if info.min >= 0 and info.max < self.vocab_size:
            return
        for start in range(0, len(self.tokens), chunk):
            part = self.tokens[start : start + chunk]
            high, low = part.max(), part.min()
            if high >= self.vocab_size or low < 0:
                bad = int(high) if high >= self.vocab_size else int(low)
                at = start + int(np.argmax(part == bad))
                raise DataError(
                    f"data file {self.path!r} holds token id {bad} at position {at}, outside "
                    f"[0, model.vocab_size={self.vocab_size}); raise model.vocab_size or re-tokenize"
                )

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            dtype = np.int32 if self.num_windows < 2**31 else np.int64  # halves memory on huge files
            perm = np.arange(self.num_windows, dtype=dtype)
            np.random.default_rng(_seed_words(_EPOCH, self.seed, epoch)).shuffle(perm)
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


def build_dataset(cfg, split: str = "train") -> SyntheticData | MemmapData | None:
    """The dataset for `split`, or None when a memmap source has no such split (no val.npy, or data.path is
    a single file: only folders carry a validation split)."""
    m, t = cfg.model, cfg.train
    if cfg.data.kind == "synthetic":
        return SyntheticData(m.vocab_size, t.seq_len, t.seed, split)
    if cfg.data.kind != "memmap":
        raise DataError(f"data.kind={cfg.data.kind!r} is not valid; choose synthetic or memmap")
    path = cfg.data.path
    if path is None:
        raise DataError("data.kind=memmap needs data.path (a .npy file or a folder holding train.npy)")
    if os.path.isdir(path):
        file = os.path.join(path, f"{split}.npy")
        if split != "train" and not os.path.exists(file):
            return None
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
        if isinstance(dataset, MemmapData):
            dataset.check_token_ids()


def rank_microbatches(
    dataset, step: int, dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's rows of the global batch of `step`, cut into (inputs, targets) micro-batches.

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
    tokens = dataset.batch(step, dp_rank * per_rank, per_rank)
    out = []
    for i in range(0, per_rank, micro_batch_size):
        mb = tokens[i : i + micro_batch_size]
        out.append((mb[:, :-1].contiguous(), mb[:, 1:].contiguous()))
    return out


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

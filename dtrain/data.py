"""Token data: a learnable synthetic stream and windows over a memory-mapped .npy token file.

The equivalence contract (docs/design.md) needs the global batch of step `s` to be a function of (seed, s)
only, so every dataset here is stateless: `batch(step, start, count)` returns rows `start .. start+count-1` of
that global batch, and a row is the same whichever window it is requested in. Resuming is then a matter of
knowing the step, and each data-parallel rank materialises only its own rows.
"""

from __future__ import annotations

import json
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
_CHAIN, _SAMPLE, _EPOCH, _MIX = 1, 2, 3, 4

MANIFEST = "manifest.json"  # what a prepared folder holds (prepare_data)


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

    def check_token_ids(self) -> None:
        """Every token id in the file lies in [0, vocab_size): read once, in chunks, at start-up, so a
        bad file fails before any process group exists or anything is written (batch() checks again as
        it reads). Skipped when the dtype cannot hold a bad id (uint8 data and a 256-token vocabulary)."""
        _check_ids(self.tokens, self.vocab_size, self.path)

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


class DocumentData:
    """Rows of seq_len + 1 tokens built from the documents of a prepared folder (`dtrain prepare-data`
    with --format jsonl, prompt-response or chat), with a learned-token mask.

    A document of at most seq_len + 1 tokens is one piece; a longer one is cut into pieces of
    seq_len + 1 tokens that overlap by one, so every token after its first is a target once. Epoch e
    orders the pieces by a permutation drawn from (seed, e). Without packing a row is one piece, padded;
    with packing, pieces are laid into rows greedily in that order (a piece that does not fit in what is
    left of a row starts the next one), so a piece is never split. Global row n = step * global_batch_size
    + index is row n of that sequence of epochs: a function of (seed, step) only.

    Position t's target is the token at t + 1 when both are in the same piece and the token at t + 1 is
    learned (a response, an assistant turn, or any token of plain documents); otherwise -100. A piece's
    target count therefore does not depend on where it lands, which gives every rank the global batch's
    target count from the index alone (`target_tokens`), without a collective or the other rows' tokens.
    """

    documents = True

    def __init__(
        self,
        folder: str,
        split: str,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        vocab_size: int,
        packing: bool,
    ):
        self.path = os.path.join(folder, f"{split}.npy")
        self.tokens = _load_tokens(self.path)
        offsets = np.load(os.path.join(folder, f"{split}.docs.npy"), allow_pickle=False).astype(np.int64)
        mask_path = os.path.join(folder, f"{split}.mask.npy")
        self.learned = np.load(mask_path, mmap_mode="r") if os.path.exists(mask_path) else None
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.vocab_size, self.packing = vocab_size, packing
        self.pad_id = 0
        L = seq_len
        lengths = np.diff(offsets)
        n_pieces = np.maximum(lengths - 1 + L - 1, 0) // L  # ceil((n - 1) / L); a 1-token document has none
        doc = np.repeat(np.arange(len(lengths)), n_pieces)
        first = np.cumsum(n_pieces) - n_pieces
        k = np.arange(int(n_pieces.sum())) - np.repeat(first, n_pieces)  # piece index inside its document
        self.starts = offsets[:-1][doc] + k * L
        self.lengths = np.minimum(L + 1, offsets[1:][doc] - self.starts)
        if len(self.starts) == 0:
            raise DataError(f"{folder}: the {split} split holds no document of two or more tokens")
        if self.learned is None:
            self.piece_targets = self.lengths - 1
        else:  # learned tokens 1 .. n-1 of the piece: each is the target of the position before it
            c = np.concatenate([[0], np.cumsum(self.learned, dtype=np.int64)])
            self.piece_targets = c[self.starts + self.lengths] - c[self.starts + 1]
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (piece order, row bounds)
        self._rows_before = [0]  # rows of epochs 0 .. e-1

    def check_token_ids(self) -> None:
        _check_ids(self.tokens, self.vocab_size, self.path)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds): row r of epoch e is pieces order[bounds[r] : bounds[r + 1]]."""
        if epoch not in self._epochs:
            n = len(self.starts)
            order = np.arange(n)
            np.random.default_rng(_seed_words(_EPOCH, self.seed, epoch)).shuffle(order)
            if not self.packing:
                bounds = np.arange(n + 1)
            else:
                cut, used, room = [0], 0, self.seq_len + 1
                for i, n_tok in enumerate(self.lengths[order].tolist()):
                    # greedy in order, so a row is a contiguous run of the epoch's order
                    if used + n_tok > room:
                        cut.append(i)
                        used = 0
                    used += n_tok
                cut.append(n)
                bounds = np.array(cut)
            if len(self._epochs) >= 2:  # a batch straddles at most one epoch boundary
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, bounds)
        return self._epochs[epoch]

    def epoch_rows(self, epoch: int) -> int:
        return len(self._epoch(epoch)[1]) - 1

    def _locate(self, n: int) -> tuple[int, int]:
        """(epoch, row within it) of global row n; epochs before it are packed once to count their rows."""
        while self._rows_before[-1] <= n:
            e = len(self._rows_before) - 1
            self._rows_before.append(self._rows_before[-1] + self.epoch_rows(e))
        e = int(np.searchsorted(self._rows_before, n, side="right")) - 1
        return e, n - self._rows_before[e]

    def _pieces(self, step: int, start: int, count: int) -> list[np.ndarray]:
        if step < 0 or start < 0 or count < 0 or start + count > self.global_batch_size:
            raise DataError(
                f"batch(step={step}, start={start}, count={count}) is outside the global batch of "
                f"train.global_batch_size={self.global_batch_size}"
            )
        out = []
        for i in range(count):
            e, r = self._locate(step * self.global_batch_size + start + i)
            order, bounds = self._epoch(e)
            out.append(order[bounds[r] : bounds[r + 1]])
        return out

    def target_tokens(self, step: int, start: int = 0, count: int | None = None) -> int:
        """Target tokens of rows start .. start+count-1 of step `step` (default: the whole global batch)."""
        count = self.global_batch_size - start if count is None else count
        return int(sum(int(self.piece_targets[p].sum()) for p in self._pieces(step, start, count)))

    def rows(self, step: int, start: int, count: int) -> dict[str, np.ndarray]:
        """tokens, doc (1, 2, ... per piece, 0 on padding), pos (from 0 in each piece), learned; each
        int64 (count, seq_len + 1)."""
        width = self.seq_len + 1
        out = {k: np.zeros((count, width), dtype=np.int64) for k in ("tokens", "doc", "pos", "learned")}
        out["tokens"][:] = self.pad_id
        for i, pieces in enumerate(self._pieces(step, start, count)):
            at = 0
            for j, p in enumerate(pieces):
                a, n = int(self.starts[p]), int(self.lengths[p])
                out["tokens"][i, at : at + n] = self.tokens[a : a + n]
                out["doc"][i, at : at + n] = j + 1
                out["pos"][i, at : at + n] = np.arange(n)
                out["learned"][i, at : at + n] = 1 if self.learned is None else self.learned[a : a + n]
                at += n
        if out["tokens"].max() >= self.vocab_size or out["tokens"].min() < 0:
            _check_ids(self.tokens, self.vocab_size, self.path)
        return out

    def batch(self, step: int, start: int, count: int) -> torch.Tensor:
        return torch.from_numpy(self.rows(step, start, count)["tokens"])


class MixtureData:
    """Several prepared folders, weighted: row i of the global batch of step s is row i of step s of
    source c, with c drawn from the weights by a generator keyed on (seed, s). Each source is indexed as
    if it were the only one (its rows not drawn are skipped), so a row depends on (seed, step, index)
    only, and each source is read in its own epoch order at its weight's share."""

    documents = True

    def __init__(self, sources: list, weights: list[float], seed: int, global_batch_size: int, seq_len: int):
        self.sources, self.seed, self.global_batch_size, self.seq_len = (
            sources,
            seed,
            global_batch_size,
            seq_len,
        )
        w = np.asarray(weights, dtype=np.float64)
        self.cdf = np.cumsum(w / w.sum())

    def source_of(self, step: int) -> np.ndarray:
        u = np.random.default_rng(_seed_words(_MIX, self.seed, step)).random(self.global_batch_size)
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.sources) - 1)

    def check_token_ids(self) -> None:
        for s in self.sources:
            s.check_token_ids()

    def target_tokens(self, step: int, start: int = 0, count: int | None = None) -> int:
        count = self.global_batch_size - start if count is None else count
        which = self.source_of(step)
        return sum(_row_targets(self.sources[which[i]], step, i) for i in range(start, start + count))

    def rows(self, step: int, start: int, count: int) -> dict[str, np.ndarray]:
        which = self.source_of(step)
        parts = [_rows_of(self.sources[which[i]], step, i, 1) for i in range(start, start + count)]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "doc", "pos", "learned")}

    def batch(self, step: int, start: int, count: int) -> torch.Tensor:
        return torch.from_numpy(self.rows(step, start, count)["tokens"])


def _row_targets(source, step: int, index: int) -> int:
    return source.target_tokens(step, index, 1) if getattr(source, "documents", False) else source.seq_len


def _rows_of(source, step: int, start: int, count: int) -> dict[str, np.ndarray]:
    """Rows of any dataset in DocumentData.rows's form: a token stream's row is one document."""
    if getattr(source, "documents", False):
        return source.rows(step, start, count)
    tokens = source.batch(step, start, count).numpy()
    width = tokens.shape[1]
    return {
        "tokens": tokens,
        "doc": np.ones_like(tokens),
        "pos": np.broadcast_to(np.arange(width), tokens.shape).copy(),
        "learned": np.ones_like(tokens),
    }


def _load_tokens(path: str) -> np.ndarray:
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"data file {path!r} must be a 1-D integer array; re-run `dtrain prepare-data`")
    return tokens


def _check_ids(tokens: np.ndarray, vocab_size: int, path: str, chunk: int = 1 << 24) -> None:
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


def document_microbatches(rows: dict[str, np.ndarray], micro_batch_size: int) -> list[tuple]:
    """Rows of DocumentData.rows as (inputs, targets, context) micro-batches: a target counts where the
    next token is in the same piece and learned, so a document's last token and padding have none."""
    tok, doc = rows["tokens"], rows["doc"]
    keep = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] > 0) & (rows["learned"][:, 1:] > 0)
    targets = torch.from_numpy(np.where(keep, tok[:, 1:], -100))
    inputs = torch.from_numpy(np.ascontiguousarray(tok[:, :-1]))
    positions = torch.from_numpy(np.ascontiguousarray(rows["pos"][:, :-1]))
    doc_ids = torch.from_numpy(np.ascontiguousarray(doc[:, :-1]))
    out = []
    for i in range(0, len(tok), micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        out.append((inputs[sl], targets[sl], {"positions": positions[sl], "doc_ids": doc_ids[sl]}))
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

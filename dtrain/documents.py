"""Documents of a prepared folder (`dtrain prepare-data` --format jsonl, prompt-response or chat) as rows
with learned-token masks and per-document positions, packed or one per row; mixtures of several folders;
and their rows as micro-batches. Stateless, as every dataset (dtrain/data.py): a row is a function of
(seed, step, index)."""

from __future__ import annotations

import os

import numpy as np
import torch

from dtrain.data_files import EPOCH, MIX, DataError, check_ids, load_tokens, seed_words


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
        self.tokens = load_tokens(self.path)
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
        check_ids(self.tokens, self.vocab_size, self.path)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds): row r of epoch e is pieces order[bounds[r] : bounds[r + 1]]."""
        if epoch not in self._epochs:
            n = len(self.starts)
            order = np.arange(n)
            np.random.default_rng(seed_words(EPOCH, self.seed, epoch)).shuffle(order)
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
            check_ids(self.tokens, self.vocab_size, self.path)
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
        u = np.random.default_rng(seed_words(MIX, self.seed, step)).random(self.global_batch_size)
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

"""Data: determinism, rank slicing, synthetic learnability, memmap windows/epochs, and refusals."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dtrain.config import Config
from dtrain.data import (
    DataError,
    MemmapData,
    SyntheticData,
    build_dataset,
    rank_microbatches,
)
from dtrain.prepare import prepare_text

# ---------------------------------------------------------------- synthetic


def test_synthetic_shape_dtype_range():
    d = SyntheticData(vocab_size=50, seq_len=33, seed=1)
    b = d.batch(step=0, start=0, count=5)
    assert b.shape == (5, 34) and b.dtype == torch.int64 and b.is_contiguous()
    assert int(b.min()) >= 0 and int(b.max()) < 50


def test_synthetic_row_independent_of_window():
    d = SyntheticData(256, 64, seed=7)
    full = d.batch(3, 0, 16)
    assert torch.equal(d.batch(3, 5, 4), full[5:9])
    assert torch.equal(d.batch(3, 15, 1), full[15:])
    # A fresh object (another process, a resumed run) gives the same rows.
    assert torch.equal(SyntheticData(256, 64, seed=7).batch(3, 2, 6), full[2:8])
    # Rows within a batch are distinct samples, not copies.
    assert not torch.equal(full[0], full[1])


@pytest.mark.parametrize(
    "seed,split,step", [(8, "train", 3), (7, "val", 3), (7, "train", 4), (-7, "train", 3)]
)
def test_synthetic_differs_by_seed_split_step(seed, split, step):
    base = SyntheticData(256, 64, seed=7, split="train").batch(3, 0, 4)
    assert not torch.equal(SyntheticData(256, 64, seed=seed, split=split).batch(step, 0, 4), base)


def test_synthetic_chain_shared_across_splits():
    # Validation must come from the same process as training, only different samples.
    tr, va = SyntheticData(64, 8, seed=3, split="train"), SyntheticData(64, 8, seed=3, split="val")
    assert np.array_equal(tr._table, va._table) and tr.entropy_floor == va.entropy_floor


def _bigram_conditional_entropy(tokens: np.ndarray, vocab: int) -> float:
    prev, nxt = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
    counts = np.bincount(prev * vocab + nxt, minlength=vocab * vocab).reshape(vocab, vocab).astype(float)
    rows = counts.sum(1, keepdims=True)
    p = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return float(-(counts * logp).sum() / counts.sum())


@pytest.mark.parametrize("vocab", [64, 256])
def test_synthetic_is_learnable_and_floor_is_right(vocab):
    d = SyntheticData(vocab, 1024, seed=1234)
    tokens = d.batch(0, 0, 400).numpy()
    h = _bigram_conditional_entropy(tokens, vocab)
    assert d.entropy_floor < 0.6 * math.log(vocab)
    assert h < 0.6 * math.log(vocab)
    # The plug-in estimate is biased slightly low (unseen rare transitions); allow for that only.
    assert d.entropy_floor - 0.06 < h < d.entropy_floor + 0.02
    # Every id appears (the smoothing term), so no embedding row goes untrained.
    assert len(np.unique(tokens)) == vocab


def test_synthetic_bigram_model_learns_to_near_floor():
    # A bigram table is all the chain needs, so training one is a cheap stand-in for "a small model learns".
    vocab = 64
    d = SyntheticData(vocab, 64, seed=0)
    logits = torch.nn.Parameter(torch.zeros(vocab, vocab))
    opt = torch.optim.Adam([logits], lr=0.3)

    def loss_at(step):
        x, y = rank_microbatches(d, step, 0, 1, 16, 16)[0]
        return torch.nn.functional.cross_entropy(logits[x].reshape(-1, vocab), y.reshape(-1))

    for step in range(100):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # steps never trained on: held-out data
        held_out = sum(loss_at(10_000 + i).item() for i in range(8)) / 8
    assert held_out < 0.6 * math.log(vocab)
    assert d.entropy_floor - 0.05 < held_out < d.entropy_floor + 0.15  # near the floor, never below it


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(DataError, match="vocab_size"):
        SyntheticData(0, 8, seed=0)
    with pytest.raises(DataError, match="seq_len"):
        SyntheticData(8, 0, seed=0)
    with pytest.raises(DataError, match="non-negative"):
        SyntheticData(8, 8, seed=0).batch(-1, 0, 1)


# ---------------------------------------------------------------- rank slicing


@pytest.fixture
def stream(tmp_path):
    """A prepared byte stream of random bytes (so windows are distinct) and the bytes themselves."""
    raw = np.random.default_rng(0).integers(0, 256, size=2000, dtype=np.uint8)
    src = tmp_path / "corpus.txt"
    src.write_bytes(raw.tobytes())
    info = prepare_text(str(src), str(tmp_path / "prepared"), val_fraction=0.1)
    return raw, info


@pytest.mark.parametrize("kind", ["synthetic", "memmap"])
@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_rank_microbatches_reassemble_global_batch(kind, dp, mbs, stream):
    gbs, seq = 16, 12
    if kind == "synthetic":
        ds = SyntheticData(97, seq, seed=5)
    else:
        ds = MemmapData(os.path.join(stream[1]["out_dir"], "train.npy"), seq, gbs, seed=5, vocab_size=256)
    step = 3
    full = ds.batch(step, 0, gbs)
    xs, ys = [], []
    for rank in range(dp):
        mbs_list = rank_microbatches(ds, step, rank, dp, mbs, gbs)
        assert len(mbs_list) == gbs // dp // mbs
        for x, y in mbs_list:
            assert x.shape == y.shape == (mbs, seq)
            assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
            xs.append(x)
            ys.append(y)
    assert torch.equal(torch.cat(xs), full[:, :-1])
    assert torch.equal(torch.cat(ys), full[:, 1:])


def test_rank_microbatches_materialises_only_own_rows():
    calls = []

    class Spy(SyntheticData):
        def batch(self, step, start, count):
            calls.append((step, start, count))
            return super().batch(step, start, count)

    ds = Spy(32, 4, seed=0)
    rank_microbatches(ds, 9, dp_rank=2, dp_size=4, micro_batch_size=2, global_batch_size=16)
    assert calls == [(9, 8, 4)]


@pytest.mark.parametrize(
    "rank,dp,mbs,gbs", [(0, 3, 1, 16), (0, 2, 3, 16), (2, 2, 1, 16), (0, 0, 1, 16), (0, 1, 0, 16)]
)
def test_rank_microbatches_rejects_bad_layout(rank, dp, mbs, gbs):
    with pytest.raises(DataError):
        rank_microbatches(SyntheticData(8, 4, seed=0), 0, rank, dp, mbs, gbs)


# ---------------------------------------------------------------- memmap


def test_prepare_text_splits_and_writes_clean_npy(stream, tmp_path):
    raw, info = stream
    assert info == {"train_tokens": 1800, "val_tokens": 200, "vocab_size": 256, "out_dir": info["out_dir"]}
    train = np.load(os.path.join(info["out_dir"], "train.npy"), allow_pickle=False)
    val = np.load(os.path.join(info["out_dir"], "val.npy"), allow_pickle=False)
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert np.array_equal(np.concatenate([train, val]), raw)
    assert sorted(os.listdir(info["out_dir"])) == ["train.npy", "val.npy"]  # no temp files left behind
    # Re-preparing with no validation removes the stale val.npy rather than pairing it with new data.
    info2 = prepare_text(str(tmp_path / "corpus.txt"), info["out_dir"], val_fraction=0.0, dtype="uint32")
    assert info2["val_tokens"] == 0 and sorted(os.listdir(info["out_dir"])) == ["train.npy"]
    assert np.load(os.path.join(info["out_dir"], "train.npy")).dtype == np.uint32


def test_memmap_windows_are_slices_and_epochs_visit_each_once(stream):
    raw, info = stream
    seq, gbs = 16, 8
    ds = MemmapData(os.path.join(info["out_dir"], "train.npy"), seq, gbs, seed=11, vocab_size=256)
    train = raw[: info["train_tokens"]].astype(np.int64)
    assert ds.num_windows == (len(train) - 1) // seq
    where = {tuple(train[w * seq : w * seq + seq + 1]): w for w in range(ds.num_windows)}
    assert len(where) == ds.num_windows  # random bytes: windows are distinguishable by content
    # Enough steps for three epochs; map each row back to the window it must be an exact slice of.
    steps = 3 * ds.num_windows // gbs + 1
    seen = [where[tuple(row.tolist())] for s in range(steps) for row in ds.batch(s, 0, gbs)]
    epochs = [seen[e * ds.num_windows : (e + 1) * ds.num_windows] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(ds.num_windows))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(ds.num_windows))  # reshuffled, not in order
    assert seen == [int(w) for s in range(steps) for w in ds.window_ids(s, 0, gbs)]


def test_memmap_resumable_and_window_independent(stream):
    path = os.path.join(stream[1]["out_dir"], "train.npy")
    a = MemmapData(path, 16, 8, seed=4, vocab_size=256)
    history = [a.batch(s, 0, 8) for s in range(40)]  # crosses several epoch boundaries
    b = MemmapData(path, 16, 8, seed=4, vocab_size=256)  # a resumed run: fresh object, straight to step 37
    assert torch.equal(b.batch(37, 0, 8), history[37])
    assert torch.equal(b.batch(21, 3, 4), history[21][3:7])
    c = MemmapData(path, 16, 8, seed=5, vocab_size=256)
    assert not torch.equal(c.batch(0, 0, 8), history[0])
    with pytest.raises(DataError, match="global_batch_size"):
        a.batch(0, 6, 3)


def test_memmap_token_id_check(stream):
    path = os.path.join(stream[1]["out_dir"], "train.npy")
    ds = MemmapData(path, 16, 8, seed=0, vocab_size=100)  # random bytes go up to 255
    with pytest.raises(DataError, match=r"token id \d+ >= model\.vocab_size=100; raise model\.vocab_size"):
        ds.batch(0, 0, 8)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.zeros((4, 40), dtype=np.uint16), "1-D"),
        (np.zeros(100, dtype=np.float32), "dtype float32"),
        (np.zeros(16, dtype=np.uint16), "fewer than train.seq_len"),
        (np.array([{"a": 1}], dtype=object), r"not a \.npy array|dtype object"),
    ],
)
def test_memmap_refuses_bad_files(tmp_path, array, match):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError, match=match):
        MemmapData(str(path), 16, 8, seed=0, vocab_size=256)


def test_memmap_refuses_missing_and_non_npy(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MemmapData(str(tmp_path / "nope.npy"), 16, 8, seed=0, vocab_size=256)
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(DataError, match=r"not a \.npy array"):
        MemmapData(str(tmp_path / "text.npy"), 16, 8, seed=0, vocab_size=256)


@pytest.mark.parametrize(
    "kwargs,content,match",
    [
        (dict(val_fraction=1.0), b"abc", "val_fraction"),
        (dict(val_fraction=-0.1), b"abc", "val_fraction"),
        (dict(dtype="int8"), b"abc", "uint16 or uint32"),
        ({}, b"", "empty"),
        ({}, None, "does not exist"),
    ],
)
def test_prepare_text_refusals(tmp_path, kwargs, content, match):
    src = tmp_path / "in.txt"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare_text(str(src), str(tmp_path / "out"), **kwargs)


# ---------------------------------------------------------------- build_dataset


def _cfg(kind="synthetic", path=None, seq_len=16):
    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.train.seq_len = kind, path, seq_len
    return cfg


def test_build_dataset_synthetic():
    tr, va = build_dataset(_cfg(), "train"), build_dataset(_cfg(), "val")
    assert isinstance(tr, SyntheticData) and isinstance(va, SyntheticData)
    assert (tr.vocab_size, tr.seq_len, tr.seed, va.split) == (256, 16, Config().train.seed, "val")


def test_build_dataset_memmap_folder_and_file(stream, tmp_path):
    folder = stream[1]["out_dir"]
    tr, va = build_dataset(_cfg("memmap", folder)), build_dataset(_cfg("memmap", folder), "val")
    assert isinstance(tr, MemmapData) and tr.path.endswith("train.npy")
    assert isinstance(va, MemmapData) and va.path.endswith("val.npy")
    file = os.path.join(folder, "train.npy")
    assert isinstance(build_dataset(_cfg("memmap", file)), MemmapData)
    assert build_dataset(_cfg("memmap", file), "val") is None  # a single file has no validation split
    os.unlink(os.path.join(folder, "val.npy"))
    assert build_dataset(_cfg("memmap", folder), "val") is None
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(_cfg("memmap", str(tmp_path / "missing")))
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(_cfg("memmap", str(tmp_path)))  # a folder without train.npy
    with pytest.raises(DataError, match="fewer than"):
        build_dataset(_cfg("memmap", folder, seq_len=5000))

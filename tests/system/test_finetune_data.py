"""Real text in: tokenizer folders read as transformers reads them, prepare-data's formats and their
learned-token masks, document rows (packed and not), and the one-line refusals of bad input.

Tokenizers are trained here with the `tokenizers` library on generated words and saved as Hugging Face
folders (tests/hf_models.py); transformers is the reference for ids and chat rendering. No processes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dtrain.config import load_config
from dtrain.data import DocumentData, build_dataset, global_target_tokens, rank_microbatches
from dtrain.prepare import prepare_data
from dtrain.tokenizer import Tokenizer
from dtrain.validation import validate
from tests.hf_models import make_tokenizer, sample_text

CHAT = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "cab bad"},
    {"role": "assistant", "content": "fed dig"},
    {"role": "user", "content": "kale"},
    {"role": "assistant", "content": "lime jade"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_ids_equal_transformers(tok_dir, hf_tok):
    ours = Tokenizer(tok_dir)
    assert ours.eos_id == hf_tok.eos_token_id
    for text in [sample_text(40, 1), "  odd   spacing cab\nfig", "<|user|>cab<|end|>", ""]:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf_tok(text, add_special_tokens=special)["input_ids"], (text, special)
            assert ours.decode(ids) == hf_tok.decode(ids)


def test_chat_rendering_equals_apply_chat_template(tok_dir, hf_tok):
    ours = Tokenizer(tok_dir)
    for messages, prompt in ((CHAT, False), (CHAT[:4], True), (CHAT[1:3], False)):
        text = ours.render_chat(messages, add_generation_prompt=prompt)
        assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.encode(text, add_special_tokens=False) == list(ids)


def test_eos_from_config_json_when_the_tokenizer_config_has_none(tok_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tok_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer(str(folder)).eos_id == 5


def test_prompt_response_tokens_and_mask(tok_dir, tmp_path):
    tok = Tokenizer(tok_dir)
    records = [{"prompt": sample_text(5, i), "response": sample_text(4, 100 + i)} for i in range(6)]
    info = prepare_data(_jsonl(tmp_path / "pr.jsonl", records), str(tmp_path / "out"), "prompt-response",
                        tok_dir, val_fraction=0.0)  # fmt: skip
    assert "val" not in info["splits"] and not (tmp_path / "out" / "val.npy").exists()
    tokens = np.load(tmp_path / "out" / "train.npy")
    offsets = np.load(tmp_path / "out" / "train.docs.npy")
    mask = np.load(tmp_path / "out" / "train.mask.npy")
    for i, r in enumerate(records):
        p = tok.encode(r["prompt"], add_special_tokens=True)
        q = tok.encode(r["response"], add_special_tokens=False)
        doc = slice(offsets[i], offsets[i + 1])
        assert tokens[doc].tolist() == [*p, *q, tok.eos_id]
        assert mask[doc].tolist() == [0] * len(p) + [1] * (len(q) + 1)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "prompt-response" and manifest["masks"] is True
    assert manifest["splits"]["train"]["targets"] == int(mask.sum())


def test_chat_learns_the_assistant_turns_with_their_end_token(tok_dir, tmp_path):
    tok = Tokenizer(tok_dir)
    prepare_data(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), str(tmp_path / "out"), "chat", tok_dir,
                 val_fraction=0.0)  # fmt: skip
    tokens = np.load(tmp_path / "out" / "train.npy").tolist()
    mask = np.load(tmp_path / "out" / "train.mask.npy").tolist()
    assert tokens[:-1] == tok.encode(tok.render_chat(CHAT), add_special_tokens=False)
    assert tokens[-1] == tok.eos_id and mask[-1] == 1
    text = tok.render_chat(CHAT)
    _, offsets = tok.encode_with_offsets(text)
    covered = {c for (a, b), m in zip(offsets, mask[:-1], strict=True) if m for c in range(a, b)}
    spans = [(text.index(t), text.index(t) + len(t)) for t in ("fed dig<|end|>\n", "lime jade<|end|>\n")]
    assert covered == {c for a, b in spans for c in range(a, b)}


def _doc_cfg(folder, packing, seq_len=16, batch=4, vocab=96):
    return validate(load_config(None, [
        "data.kind=memmap", f"data.path={folder}", f"data.packing={str(packing).lower()}",
        f"train.seq_len={seq_len}", f"train.global_batch_size={batch}", "train.micro_batch_size=2",
        f"model.vocab_size={vocab}", "model.max_seq_len=32",
    ]), 1)  # fmt: skip


def test_packed_rows_hold_whole_documents_with_restarting_positions(tok_dir, tmp_path):
    # Documents of 3 to ~40 tokens into rows of 17: short ones whole, long ones cut into row-sized pieces.
    records = [{"prompt": sample_text(1 + i % 4, i), "response": sample_text(1 + (i * 7) % 13, i)}
               for i in range(20)]  # fmt: skip
    prepare_data(_jsonl(tmp_path / "d.jsonl", records), str(tmp_path / "out"), "prompt-response", tok_dir,
                 val_fraction=0.0)  # fmt: skip
    data = build_dataset(_doc_cfg(tmp_path / "out", packing=True))
    assert isinstance(data, DocumentData)
    assert (data.lengths <= 17).all() and len(data.starts) > 20  # some documents were cut
    rows = data.rows(3, 0, 4)
    for i in range(4):
        doc, pos = rows["doc"][i], rows["pos"][i]
        for d in set(doc.tolist()) - {0}:
            at = np.flatnonzero(doc == d)
            assert (np.diff(at) == 1).all() and pos[at].tolist() == list(range(len(at)))
    # Targets: only learned next tokens inside a piece; the count is what the index predicts.
    micro = rank_microbatches(data, 3, 0, 1, 2, 4)
    counted = sum(int((y != -100).sum()) for _, y, _ in micro)
    assert counted == data.target_tokens(3) == global_target_tokens(data, 3, 4)
    # An epoch lays every piece into a row exactly once, packed or not, in an order drawn from the seed.
    for packing in (True, False):
        d = DocumentData(str(tmp_path / "out"), "train", 16, 4, 1234, 96, packing)
        order, bounds = d._epoch(0)
        assert sorted(order.tolist()) == list(range(len(d.starts))) and bounds[-1] == len(d.starts)
        assert order.tolist() != sorted(order.tolist())
        used = np.concatenate(d._pieces(0, 0, 4))
        assert used.tolist() == order[: bounds[4]].tolist()
    # Rows of a step are the same whichever window asks for them (and in another process).
    again = DocumentData(str(tmp_path / "out"), "train", 16, 4, 1234, 96, True).rows(3, 1, 2)
    assert all(np.array_equal(again[k], rows[k][1:3]) for k in rows)
    # A resumed run asks for a late step first: the same rows as a run that read every step before it.
    late = DocumentData(str(tmp_path / "out"), "train", 16, 4, 1234, 96, True).rows(40, 0, 4)
    assert all(np.array_equal(late[k], data.rows(40, 0, 4)[k]) for k in late)


def _tiny_model(vocab=96):
    from dtrain.config import ModelConfig
    from dtrain.model import Transformer, init_weights

    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(cfg)
    init_weights(model, 7)
    return model


def _loss_and_grads(model, micro, denominator, drop=()):
    model.zero_grad()
    total = 0.0
    for x, y, ctx in micro:
        ctx = {k: v for k, v in ctx.items() if k not in drop}
        loss = model(x, y, **ctx) / denominator
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_equals_one_document_per_row_in_float64(tok_dir, tmp_path):
    """The same documents packed and one per row give the same loss and gradients, to 1e-10 in float64;
    without position resets or without the document mask they do not (the mutation check)."""
    from tests.reference import float64
    from tests.tolerances import FP64

    records = [{"prompt": sample_text(1 + i % 3, i), "response": sample_text(1 + i % 5, 50 + i)}
               for i in range(8)]  # fmt: skip
    prepare_data(_jsonl(tmp_path / "d.jsonl", records), str(tmp_path / "out"), "prompt-response", tok_dir,
                 val_fraction=0.0)  # fmt: skip
    seq = 32
    unpacked = DocumentData(str(tmp_path / "out"), "train", seq, 8, 1, 96, packing=False)
    packed = DocumentData(str(tmp_path / "out"), "train", seq, 8, 1, 96, packing=True)
    n_rows = len(packed._epoch(0)[1]) - 1
    assert n_rows < 8 and len(unpacked.starts) == 8  # several documents share a row
    from dtrain.data import document_microbatches

    with float64():
        model = _tiny_model()
        one = document_microbatches(unpacked.rows(0, 0, 8), 4)
        many = document_microbatches(packed.rows(0, 0, n_rows), 4)
        n = unpacked.target_tokens(0)
        assert n == packed.target_tokens(0, 0, n_rows) == sum(int((y != -100).sum()) for _, y, _ in many)
        loss_one, grads_one = _loss_and_grads(model, one, n)
        loss_many, grads_many = _loss_and_grads(model, many, n)
        torch.testing.assert_close(torch.tensor(loss_many), torch.tensor(loss_one), **FP64)
        for name, g in grads_one.items():
            torch.testing.assert_close(grads_many[name], g, **FP64, msg=name)
        # Mutation: without the document mask a document attends to the ones before it in its row.
        loss_bad, _ = _loss_and_grads(model, many, n, ("doc_ids",))
        assert abs(loss_bad - loss_one) > 1e-6 * abs(loss_one)
        # Without the position resets (the row's positions instead) the loss moves only by rounding:
        # rotary scores depend on q and k positions through their difference alone, which the mask keeps
        # inside one document. The resets matter where absolute positions do (a prefix the model
        # continues, as generation will); the rows above are checked for them directly.
        loss_row_positions, _ = _loss_and_grads(model, many, n, ("positions",))
        assert abs(loss_row_positions - loss_one) <= 1e-12 * abs(loss_one)


# ------------------------------------------------------------------------------------------ bad input


def _fails(capsys, argv, *fragments):
    from dtrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("dtrain: error: "), err
    for f in fragments:
        assert f in err, err
    return err


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "cab"}\n\n{"text": "bad"\n')
    out = tmp_path / "out"
    _fails(capsys, ["prepare-data", str(src), "--out", str(out), "--format", "jsonl"], f"{src}:3:", "JSON")
    assert not out.exists()


def test_record_without_learned_tokens(tok_dir, tmp_path, capsys):
    out = tmp_path / "out"
    src = _jsonl(
        tmp_path / "pr.jsonl", [{"prompt": "cab", "response": "bad"}, {"prompt": "fed", "response": ""}]
    )
    _fails(capsys, ["prepare-data", src, "--out", str(out), "--format", "prompt-response", "--tokenizer",
                    tok_dir], f"{src}:2:", "no learned tokens")  # fmt: skip
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[:2]}])
    _fails(capsys, ["prepare-data", src, "--out", str(out), "--format", "chat", "--tokenizer", tok_dir],
           f"{src}:1:", "no assistant message")  # fmt: skip
    assert not out.exists()


def test_chat_without_the_templates_roles(tok_dir, tmp_path, capsys):
    out = tmp_path / "out"
    bad = [{"role": "user", "content": "cab"}, {"role": "bot", "content": "bad"}]
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": bad}])
    _fails(capsys, ["prepare-data", src, "--out", str(out), "--format", "chat", "--tokenizer", tok_dir],
           f"{src}:2:", "not bot")  # fmt: skip
    assert not out.exists()


def test_tokenizer_folder_without_tokenizer_json(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    src = tmp_path / "in.txt"
    src.write_text("cab bad")
    out = tmp_path / "out"
    _fails(capsys, ["prepare-data", str(src), "--out", str(out), "--tokenizer", str(tmp_path / "tok")],
           "no tokenizer.json")  # fmt: skip
    assert not out.exists()


def test_token_ids_beyond_the_models_vocabulary(tok_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _jsonl(src, [{"text": sample_text(20, i)} for i in range(10)])
    data = tmp_path / "data"
    prepare_data(str(src), str(data), "jsonl", tok_dir)
    run = tmp_path / "run"
    _fails(capsys, ["train", "configs/tiny.yaml", "data.kind=memmap", f"data.path={data}",
                    "model.vocab_size=8", f"run.out_dir={run}"], "model.vocab_size=8")  # fmt: skip
    assert not run.exists()


def test_mix_weight_must_be_positive(tok_dir, tmp_path, capsys):
    data = tmp_path / "data"
    prepare_data(_jsonl(tmp_path / "in.jsonl", [{"text": sample_text(20, i)} for i in range(10)]), str(data),
                 "jsonl", tok_dir)  # fmt: skip
    run = tmp_path / "run"
    mix = f"data.mix=[{{path: {data}, weight: 0}}]"
    _fails(capsys, ["train", "configs/tiny.yaml", "data.kind=memmap", mix,
                    f"run.out_dir={run}"], "data.mix[0].weight=0")  # fmt: skip
    assert not run.exists()


# ------------------------------------------------------------------------------------------ mixtures


def test_mixture_rows_come_from_the_sources_by_weight(tok_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_data(_jsonl(tmp_path / "a.jsonl", [{"text": sample_text(12, i)} for i in range(30)]), str(a),
                 "jsonl", tok_dir, val_fraction=0.0)  # fmt: skip
    records = [{"prompt": sample_text(3, i), "response": sample_text(3, 7 + i)} for i in range(30)]
    prepare_data(_jsonl(tmp_path / "b.jsonl", records), str(b), "prompt-response", tok_dir, val_fraction=0.0)
    cfg = validate(load_config(None, [
        "data.kind=memmap", f"data.mix=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 3}}]",
        "train.seq_len=16", "train.global_batch_size=64", "train.micro_batch_size=4", "model.vocab_size=96",
    ]), 1)  # fmt: skip
    mix = build_dataset(cfg)
    assert build_dataset(cfg, "val") is None  # no source has a validation split
    which = np.concatenate([mix.source_of(s) for s in range(20)])
    assert 0.7 < which.mean() < 0.8  # a quarter from a, three quarters from b
    rows = mix.rows(5, 0, 64)
    for i, c in enumerate(mix.source_of(5)):
        own = mix.sources[c].rows(5, i, 1)
        assert all(np.array_equal(rows[k][i], own[k][0]) for k in rows)
    micro = rank_microbatches(mix, 5, 1, 2, 4, 64)  # the second of two data-parallel ranks
    assert sum(int((y != -100).sum()) for _, y, _ in micro) == mix.target_tokens(5, 32, 32)
    assert global_target_tokens(mix, 5, 64) == mix.target_tokens(5)


def test_metrics_loss_tokens_bits_per_byte_and_tokens_per_parameter(tok_dir, tmp_path, capsys):
    from tests.harness import main_in_process

    data = tmp_path / "data"
    prepare_data(_jsonl(tmp_path / "in.jsonl", [{"text": sample_text(30, i)} for i in range(40)]), str(data),
                 "jsonl", tok_dir, val_fraction=0.25)  # fmt: skip
    out = tmp_path / "run"
    code, stdout, err = main_in_process(
        capsys, "train", "configs/tiny.yaml", "data.kind=memmap", f"data.path={data}", "model.vocab_size=96",
        "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=2",
        "train.eval_batches=1", f"run.out_dir={out}",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "tokens per parameter planned (Chinchilla-optimal: 20)" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["loss_tokens"] < 4 * 32 for r in records)
    manifest = json.loads((data / "manifest.json").read_text())["splits"]["val"]
    last = records[-1]
    expected = last["val_loss"] * manifest["targets"] / manifest["bytes"] / np.log(2)
    assert last["val_bpb"] == pytest.approx(expected, rel=1e-12)
    # dtrain eval reads the same document rows: the trainer's figure bit for bit, and every piece once
    checkpoint = out / "checkpoints" / "step_2"
    figures = {}
    for batches in ("1", "all"):
        written = tmp_path / f"eval_{batches}.json"
        code, _, err = main_in_process(capsys, "eval", str(checkpoint), str(data), "--batches", batches,
                                       "--out", str(written))  # fmt: skip
        assert code == 0, err[-3000:]
        figures[batches] = json.loads(written.read_text())
    assert figures["1"]["loss"] == last["val_loss"]
    assert figures["1"]["tokens"] == global_target_tokens(
        build_dataset(validate(load_config("configs/tiny.yaml", [f"data.path={data}", "data.kind=memmap",
                      "model.vocab_size=96", "train.seq_len=32", "train.global_batch_size=4"]), 1), "val"),
        0, 4)  # fmt: skip
    assert figures["all"]["tokens"] == manifest["targets"]

"""`dtrain generate` and `dtrain eval` through the command line: text and JSON output from a checkpoint
(byte-level) and from a Hugging Face folder with a tokenizer.json, prompts from a JSON-lines file, and bad
input refused in one line with exit status 2 before any weight is read or process group created."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dtrain import cli, runtime
from dtrain.generate import generate, resolve
from tests import harness, hf_models
from tests.reference import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny byte-level model (max_seq_len 32) after one training step."""
    run = tmp_path_factory.mktemp("gen") / "run"
    cli.main(
        ["train", "configs/tiny.yaml", *TINY, "model.vocab_size=256", "train.steps=1", f"run.out_dir={run}"]
    )
    return str(run / "checkpoints" / "step_1")


WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A Hugging Face folder (qwen2: no eos in its config) with a word-level tokenizer.json whose eos,
    named in tokenizer_config.json, is id 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = hf_models.make(str(tmp_path_factory.mktemp("hf") / "qwen2"), "qwen2-biases-tied", noise=0.2)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)
    return path


def dtrain(*args: str):
    """The real command line in a subprocess."""
    result = harness.run_python("-m", "dtrain", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def in_process(capsys, *args: str) -> str:
    """The command line in this process (harness.main_in_process): its stdout, after exit status 0."""
    code, out, err = harness.main_in_process(capsys, *args)
    assert code == 0, err[-3000:]
    return out


def test_generate_from_a_checkpoint_as_text_and_json(capsys, checkpoint):
    lines = dtrain(
        "generate", checkpoint, "--prompt", "the cat", "--prompt", "é", "--temperature", "0",
        "--max-new-tokens", "6", "--json",
    ).splitlines()  # fmt: skip
    records = [json.loads(line) for line in lines]
    assert [r["prompt_ids"] for r in records] == [list(b"the cat"), list("é".encode())]
    source = resolve(checkpoint)
    expected = generate(source.build(torch.device("cpu")), [list(b"the cat"), list("é".encode())], 6)
    assert [r["ids"] for r in records] == expected and all(len(ids) == 6 for ids in expected)
    assert records[0]["text"] == bytes(expected[0]).decode("utf-8", errors="replace")
    text = in_process(
        capsys, "generate", checkpoint, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "6"
    )
    assert text == "the cat" + records[0]["text"] + "\n"


def test_generate_from_a_folder_with_a_tokenizer_and_a_prompts_file(capsys, folder, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    source = resolve(folder)
    assert source.eos_ids == {2}  # from tokenizer_config.json's eos_token
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "the cat sat"}) + "\n\n" + json.dumps({"prompt_ids": [3, 9]}) + "\n"
    )
    out = in_process(
        capsys, "generate", folder, "--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "12",
        "--json",
    )  # fmt: skip
    records = [json.loads(line) for line in out.splitlines()]
    assert (
        [r["prompt_ids"] for r in records] == [tok.encode("the cat sat").ids, [3, 9]] == [[3, 4, 5], [3, 9]]
    )
    expected = generate(source.build(torch.device("cpu")), [[3, 4, 5], [3, 9]], 12, frozenset([2]))
    assert [r["ids"] for r in records] == expected
    assert [r["text"] for r in records] == [tok.decode(ids, skip_special_tokens=True) for ids in expected]


def test_sampling_from_the_command_line_is_reproducible(capsys, checkpoint):
    args = ("generate", checkpoint, "--prompt-ids", "116,104", "--max-new-tokens", "8", "--top-k", "20")
    sampled = ("--top-p", "0.9", "--temperature", "1.2", "--json")
    first = in_process(capsys, *args, *sampled, "--seed", "3")
    assert in_process(capsys, *args, *sampled, "--seed", "3") == first
    assert in_process(capsys, *args, *sampled, "--seed", "4") != first


# --- bad input -------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    def refuse(*_):
        raise AssertionError("bad input reached process-group creation")

    monkeypatch.setattr(runtime, "init_distributed", refuse)
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def fails(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def test_bad_generate_input_is_one_line(capsys, checkpoint, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    ok = (checkpoint, "--prompt-ids", "1,2")
    cases = {
        (str(tmp_path / "empty"), "--prompt", "hi"): "holds neither manifest.json nor config.json",
        (str(tmp_path / "nowhere"), "--prompt", "hi"): "is not a folder: give a dtrain checkpoint folder",
        (os.path.dirname(os.path.dirname(checkpoint)), "--prompt", "hi"): "did you mean ",
        (checkpoint, "--prompt-ids", "1,256"): "token id 256 is outside the vocabulary [0, 256)",
        (checkpoint, "--prompt", "x" * 33): "has 33 tokens, more than model.max_seq_len=32",
        (checkpoint, "--prompt-ids", "1,a"): "give comma-separated token ids",
        (checkpoint, "--prompt", ""): "is empty",
        (*ok, "--temperature", "-0.5"): "--temperature -0.5 must be >= 0",
        (*ok, "--top-p", "0"): "--top-p 0.0 must be in (0, 1]",
        (*ok, "--top-p", "1.5"): "--top-p 1.5 must be in (0, 1]",
        (*ok, "--top-k", "-1"): "--top-k -1 must be >= 0",
        (*ok, "--max-new-tokens", "0"): "--max-new-tokens 0 must be at least 1",
        (checkpoint,): "one of the arguments --prompt --prompt-ids --prompts is required",
        (*ok, "--prompt", "x"): "not allowed with argument",
        (checkpoint, "--prompts", str(tmp_path / "none.jsonl")): "does not exist",
    }
    for argv, message in cases.items():
        line = fails(capsys, "generate", *argv)
        assert line.startswith("dtrain: error: ") and message in line, (argv, line)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 1}\n')
    assert f"{bad} line 2: give" in fails(capsys, "generate", checkpoint, "--prompts", str(bad))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(folder, name), no_tokenizer / name)
    assert "has no tokenizer (tokenizer.json)" in fails(
        capsys, "generate", str(no_tokenizer), "--prompt", "a"
    )


def test_bad_eval_input_is_one_line(capsys, checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "train-only").mkdir()
    (tmp_path / "train-only" / "train.npy").write_bytes(b"")
    cases = {
        (checkpoint, str(tmp_path / "nowhere")): "is not a folder",
        (checkpoint, str(tmp_path / "train-only")): "has no val.npy",
        (str(tmp_path / "empty"), str(tmp_path / "empty")): "holds neither manifest.json nor config.json",
        (checkpoint, str(tmp_path / "empty"), "--batches", "0"): "--batches 0: give a positive number",
        (checkpoint, str(tmp_path / "empty"), "parallel.tp=3"): "world size 1 is not divisible by tp*pp*cp=3",
        (checkpoint, str(tmp_path / "empty"), "train.sed=1"): "did you mean 'train.seed'?",
    }
    for argv, message in cases.items():
        line = fails(capsys, "eval", *argv)
        assert line.startswith("dtrain: error: ") and message in line, (argv, line)


# --- samples during training -------------------------------------------------------------------------


def train_pp2(out, *overrides: str):
    result = harness.run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dtrain", "train",
        "configs/tiny.yaml", *TINY, "model.vocab_size=256", "train.steps=4", "parallel.pp=2",
        f"run.out_dir={out}", *overrides,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


SAMPLED = ("train.sample_every=2", "train.sample_prompt=the cat", "train.sample_tokens=8")


def sample_case(out: str) -> tuple[str | None, str]:
    """Train four steps under pp2 with samples every two; then sample again: (rank 0's text, step_4)."""
    from dtrain.trainer import Trainer
    from tests.reference import tiny_config

    cfg = tiny_config(
        2, "model.vocab_size=256", "train.steps=4", "parallel.pp=2", f"run.out_dir={out}", *SAMPLED
    )
    trainer = Trainer(cfg, harness.grid(pp=2, dp=1), torch.device("cpu"))
    trainer.fit()
    return trainer.sample(), os.path.join(out, "checkpoints", "step_4")


def test_samples_during_training_are_the_models_continuations(world2, tmp_path):
    """The stages' weights are gathered to rank 0: a sample is what the checkpoint of that step, loaded
    as `dtrain generate` loads it, draws with the same seed (train.seed + step)."""
    (text, checkpoint), (other, _) = world2.run(sample_case, str(tmp_path / "run"))
    assert other is None
    model = resolve(checkpoint).build(torch.device("cpu"))
    ids = generate(model, [list(b"the cat")], 8, temperature=1.0, seed=1234 + 4)[0]
    assert text == bytes(ids).decode("utf-8", errors="replace")


def test_a_sample_is_one_progress_line_and_a_tensorboard_text(capsys, tmp_path):
    from dtrain.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), 10, 5)
    logger.sample(4, "the cat", " sat\non")
    logger.close()
    assert capsys.readouterr().out == 'sample at step 4: "the cat" -> " sat\\non"\n'
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(tmp_path))


@pytest.mark.slow
def test_samples_under_torchrun_leave_the_training_unchanged(tmp_path):
    def losses(out):
        with open(out / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    stdout = train_pp2(tmp_path / "sampled", *SAMPLED)
    lines = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("sample at step")]
    assert lines == ["sample at step 2", "sample at step 4"]
    train_pp2(tmp_path / "plain")
    assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")


def test_bad_sample_settings_are_one_line(capsys, tmp_path):
    config = os.path.join(harness.repo_root(), "configs", "tiny.yaml")
    base = ("train", config, *TINY, f"run.out_dir={tmp_path / 'run'}", "train.sample_every=2")
    cases = {
        (): "train.sample_every needs train.sample_prompt",
        ("train.sample_prompt=hi",): "train.sample_every needs a tokenizer",  # vocab 96, no folder
        ("model.vocab_size=256", "train.sample_prompt=" + "x" * 32): "train.sample_prompt is 32 tokens",
        ("model.vocab_size=256", "train.sample_prompt=hi", "train.sample_tokens=0"): "train.sample_tokens=0",
    }
    for overrides, message in cases.items():
        line = fails(capsys, *base, *overrides)
        assert line.startswith("dtrain: error: ") and message in line, (overrides, line)
    assert not (tmp_path / "run").exists()

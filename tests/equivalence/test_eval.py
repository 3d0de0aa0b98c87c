"""`dtrain eval` against the trainer: the figure it prints for a checkpoint and a data folder is the
validation loss the trainer logged for them, in one process bit for bit (fp32 and bf16), and in tp2,
pp2 and dp2 (and under torchrun) to FP32; `--batches all` is the mean loss of every token of the split,
computed here directly; bits per byte of byte-level data is the loss in bits."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtrain import cli
from dtrain.prepare import prepare_text
from tests import harness
from tests.reference import TINY
from tests.tolerances import FP32

MODEL = ["model.vocab_size=256", "train.steps=3", "train.eval_batches=3"]


def train_tiny(root, *overrides: str) -> dict:
    """A tiny byte-level model trained three steps on a prepared folder: its checkpoint, the folder and
    the validation loss the trainer logged at the end."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, 2500)))
    prepare_text(str(root / "corpus.txt"), str(root / "data"), val_fraction=0.2)
    run = root / "run"
    cli.main([
        "train", os.path.join(harness.repo_root(), "configs", "tiny.yaml"), *TINY, *MODEL, "data.kind=memmap",
        f"data.path={root / 'data'}", f"run.out_dir={run}", *overrides,
    ])  # fmt: skip
    with open(run / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    return {
        "checkpoint": str(run / "checkpoints" / "step_3"),
        "data": str(root / "data"),
        "val": last["val_loss"],
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return train_tiny(tmp_path_factory.mktemp("eval"))


def test_eval_prints_and_writes_the_trainers_validation_loss(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = harness.main_in_process(
        capsys, "eval", trained["checkpoint"], trained["data"], "--out", str(out)
    )
    assert code == 0, err[-3000:]
    figures = json.loads(out.read_text())
    assert figures["loss"] == trained["val"]  # the same arithmetic on the same windows: bit for bit
    assert figures["ppl"] == math.exp(trained["val"])
    assert figures["bytes"] == figures["tokens"] == 3 * 16 * 16  # eval_batches x global batch x seq_len
    assert figures["bpb"] == pytest.approx(trained["val"] / math.log(2), rel=1e-12)
    line = stdout.strip()
    assert line.count("\n") == 0 and f"loss {trained['val']:.4f}" in line and str(out) in line


def test_eval_of_a_bf16_run_gives_its_logged_validation_loss(tmp_path, capsys):
    """bf16 training stores the parameters in bf16 (the fp32 masters rounded to nearest) and computes
    without autocast; the checkpoint holds the masters, and eval rounds them the same way: the same
    arithmetic again, so the same figure to the bit."""
    trained = train_tiny(tmp_path, "train.precision=bf16")
    out = tmp_path / "eval.json"
    code, _, err = harness.main_in_process(
        capsys, "eval", trained["checkpoint"], trained["data"], "--out", str(out)
    )
    assert code == 0, err[-3000:]
    figures = json.loads(out.read_text())
    assert figures["precision"] == "bf16"
    assert figures["loss"] == trained["val"]


def eval_case(checkpoint: str, data: str, layout: tuple[str, ...], batches: int | None) -> float:
    from dtrain.evaluate import evaluate, prepare
    from dtrain.generate import resolve

    source = resolve(checkpoint, list(layout))
    cfg, datasets = prepare(source, data, "val", dist.get_world_size())
    p = cfg.parallel
    grid = harness.grid(tp=p.tp, pp=p.pp, dp=p.dp)
    return evaluate(source, cfg, datasets, batches, grid, torch.device("cpu"))["loss"]


LAYOUTS = {"tp2": ("parallel.tp=2",), "pp2": ("parallel.pp=2",), "dp2": ()}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_eval_in_other_layouts_gives_the_same_loss(world2, trained, layout):
    losses = world2.run(eval_case, trained["checkpoint"], trained["data"], layout, 3)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([trained["val"]] * 2), **FP32)


def test_every_token_once_is_the_mean_loss_of_the_whole_split(world2, trained):
    from dtrain.generate import resolve

    model = resolve(trained["checkpoint"]).build(torch.device("cpu"))
    tokens = torch.from_numpy(np.load(f"{trained['data']}/val.npy").astype(np.int64))
    n, total = len(tokens) - 1, 0.0
    with torch.no_grad():  # windows of seq_len=16 in order, the last one shorter
        for start in range(0, n, 16):
            end = min(start + 16, n)
            logits = model(tokens[start:end][None])[0]
            total += float(F.cross_entropy(logits, tokens[start + 1 : end + 1], reduction="sum"))
    expected = total / n
    assert n % 16, "the test wants a shorter last window"
    losses = world2.run(eval_case, trained["checkpoint"], trained["data"], ("parallel.pp=2",), None)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([expected] * 2), **FP32)


def test_eval_under_torchrun(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = harness.run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dtrain", "eval",
        trained["checkpoint"], trained["data"], "parallel.tp=2", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("loss ") == 1  # rank 0 speaks
    loss = json.loads(out.read_text())["loss"]
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(trained["val"]), **FP32)


def test_a_hugging_face_folder_gives_transformers_loss(world2, tmp_path):
    """Every token once, in tp2, from a folder's weights: the mean token loss transformers computes on the
    same windows."""
    import transformers

    from tests import hf_models

    folder = hf_models.make(str(tmp_path / "qwen3"), "qwen3-qk-norm-head-dim")
    (tmp_path / "data").mkdir()
    tokens = np.random.default_rng(1).integers(0, hf_models.COMMON["vocab_size"], 150).astype(np.uint16)
    np.save(tmp_path / "data" / "val.npy", tokens)
    layout = ("parallel.tp=2", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2")
    losses = world2.run(eval_case, folder, str(tmp_path / "data"), layout, None)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, total = torch.from_numpy(tokens.astype(np.int64)), 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):
            end = min(start + 32, len(ids) - 1)
            logits = model(ids[None, start:end]).logits[0]
            total += float(F.cross_entropy(logits, ids[start + 1 : end + 1], reduction="sum"))
    expected = total / (len(ids) - 1)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([expected] * 2), **FP32)


def step_after_evaluation_case() -> dict:
    from dtrain.trainer import Trainer
    from tests.reference import tiny_config

    cfg = tiny_config(dist.get_world_size(), "model.dropout=0.1", "train.eval_batches=1")
    grid = harness.grid(dp=dist.get_world_size())
    plain, evaluated, no_dropout = (Trainer(cfg, grid, torch.device("cpu")) for _ in range(3))
    evaluated.evaluate()
    no_dropout.model.train(False)  # what a step would run in, were evaluation to leave eval mode on
    modules = list(evaluated.model.modules.modules())
    return {
        "training": all(m.training for m in modules),
        "losses": [t.train_step().loss for t in (plain, evaluated, no_dropout)],
    }


def test_a_step_after_evaluation_trains_with_dropout(world2):
    """Evaluation switches the model to eval mode and back; a step does not set the mode itself."""
    info = world2.run(step_after_evaluation_case)[0]
    assert info["training"]
    plain, evaluated, no_dropout = info["losses"]
    assert evaluated == plain  # the same step, bit for bit: dropout on and drawing the same masks
    assert no_dropout != plain  # dropout changes the loss, so the equality above says it was on

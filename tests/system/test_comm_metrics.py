"""The communication ledger's figures in a run's metrics.jsonl: on logging steps only, one in
run.ledger_every of them, equal to the prediction (dtrain/analysis/comm_volume.py) for every rank."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from tests import harness
from tests.reference import tiny_config

SMALL_BUCKETS = "parallel.bucket_mb=0.005"  # several gradient buckets even for the tiny model


def fit_and_read(out_dir: str, overrides: tuple[str, ...]) -> list[dict] | None:
    from dtrain.trainer import Trainer

    cfg = tiny_config(dist.get_world_size(), *overrides, f"run.out_dir={out_dir}")
    p = cfg.parallel
    Trainer(
        cfg,
        harness.grid(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep, dp_shard=p.dp_shard),
        torch.device("cpu"),
    ).fit()
    if dist.get_rank() != 0:
        return None
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_trainer_writes_comm_metrics_on_logging_steps_only(world2, tmp_path):
    from dtrain.analysis.comm_volume import predict

    overrides = ("parallel.zero=1", SMALL_BUCKETS, "train.steps=3", "run.log_every=2", "train.eval_batches=0")
    overrides += ("run.ledger_every=1",)  # every logging step counted (the default samples them)
    records = world2.run(fit_and_read, str(tmp_path), overrides)[0]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any(k.startswith("comm") for k in records[0])  # step 1: not a logging step
    cfg = tiny_config(2, *overrides)
    want = predict(cfg, 0).metrics()
    totals = [round(predict(cfg, r).total_bytes()) for r in range(2)]
    for record in records[1:]:  # step 2 (log_every) and the last step
        got = {k: v for k, v in record.items() if k.startswith("comm/")}
        assert got == want
        assert record["comm_bytes_per_rank"] == totals
        assert got["comm/dp/reduce_scatter_calls"] > 1 and got["comm/bookkeeping_bytes"] == 4  # the loss sum


def test_trainer_samples_one_logging_step_in_ledger_every(world2, tmp_path):
    """run.ledger_every=2 with a logging step every step: steps 1, 3 and 5 are counted, the others carry
    peak memory but no comm keys."""
    overrides = ("train.steps=5", "run.log_every=1", "run.ledger_every=2", "train.eval_batches=0")
    records = world2.run(fit_and_read, str(tmp_path), overrides)[0]
    counted = [r["step"] for r in records if "comm_bytes_per_rank" in r]
    assert counted == [1, 3, 5] and all("peak_mem_mb" in r for r in records)
    assert all(not any(k.startswith("comm") for k in r) for r in records if r["step"] not in counted)

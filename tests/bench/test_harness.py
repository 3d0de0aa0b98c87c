"""The benchmark harness's spawned world: a rank that dies after rank 0 wrote its result keeps the
measurement; one that dies before it is measured once more in a fresh world, then fails."""

import glob
import os
import tempfile
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.bench import harness


def dies_in_teardown(rank: int, args) -> dict:
    if rank == 1:  # dies as Gloo's threads sometimes do at exit, once rank 0's result is on disk
        deadline = time.monotonic() + 60
        while not glob.glob(os.path.join(tempfile.gettempdir(), "dtrain-bench-*", "rank0.pkl")):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        os._exit(3)
    return {"measured": dist.get_world_size()}


def dies_before_the_result(rank: int, args) -> dict:
    if rank == 1:
        os._exit(3)
    time.sleep(60)  # the harness stops rank 0 when rank 1 dies
    return {}


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """The spawned ranks' temporary directory is this test's alone (rank 1 looks for rank 0's file)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_a_death_after_the_result_keeps_it(own_tmp, capsys):
    result, attempts = harness.spawn(dies_in_teardown, None, 2, timeout_s=60)
    assert (result, attempts) == ({"measured": 2}, 1)
    assert "after the measurement finished; keeping it" in capsys.readouterr().out


def test_a_death_before_the_result_is_measured_again_then_fails(own_tmp, capsys):
    with pytest.raises(mp.ProcessExitedException):
        harness.spawn(dies_before_the_result, None, 2, timeout_s=60)
    assert capsys.readouterr().out.count("measuring again in a fresh world") == 1

"""The benchmark harness: a spawned rank that dies after rank 0 wrote its result keeps the measurement,
one that dies before it is measured once more in a fresh world, then fails; the contest's rounds take
turns at which implementation goes first."""

import glob
import os
import tempfile
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.bench import harness


class Recorder(harness.Implementation):
    """A step that only notes, in the list every implementation of the contest shares, who ran."""

    def __init__(self, name: str, ran: list):
        super().__init__()
        self.name, self.ran = name, ran

    def step(self, index: int) -> float:
        self.ran.append((index, self.name))
        return 0.0


def contest_order(names: list[str], warmup: int, steps: int) -> list:
    ran: list = []
    builders = {n: (lambda n=n: Recorder(n, ran)) for n in names}
    harness.contest(dist.get_rank(), builders, {n: n for n in names}, warmup, steps)
    return ran


def test_each_round_starts_with_the_next_implementation(world2):
    untimed = [(0, "a"), (0, "b"), (0, "c")]  # counting steps, one implementation after the other
    rounds = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    expected = untimed + [(1 + i, n) for i, order in enumerate(rounds) for n in order]
    assert world2.run(contest_order, ["a", "b", "c"], 1, 3) == [expected, expected]


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

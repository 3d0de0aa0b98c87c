"""A Gloo world of N CPU processes, spawned once and reused by many test cases.

Spawning and importing torch costs seconds per process on a 2-core machine, so a world stays up for the
whole session: `world.run(fn, *args)` sends a module-level function to every rank, runs it there with
torch.distributed initialised, and returns the list of per-rank results (an exception on any rank is
re-raised here with that rank's traceback). A case that fails or hangs tears the world down; the next
case gets a fresh one.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    """A free loopback port (the harness imports nothing from dtrain, so parallel/'s unit tests can run
    without it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASE_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 120


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share 2 cores; more threads only thrash
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorldError(AssertionError):
    pass


class World:
    def __init__(self, size: int):
        self.size = size
        self.procs = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.tasks = [ctx.Queue() for _ in range(self.size)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, self.size, port, self.tasks[r], self.results), daemon=True)
            for r in range(self.size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        if not self.procs:
            self._start()
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = [None] * self.size, []
        for _ in range(self.size):
            rank, ok, value = self._next_result(fn.__name__)
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                # Other ranks may now be stuck in a collective: do not wait for them.
                self.close(force=True)
                raise WorldError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return out

    def _next_result(self, name: str):
        """The next rank's result; fails at once if a worker died (a crash, not an exception)."""
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self.close(force=True)
                    raise WorldError(f"{name}: worker process died (rank, exit code): {dead}") from None
        self.close(force=True)
        raise WorldError(f"{name} did not finish on every rank within {CASE_TIMEOUT_S}s")

    def close(self, force: bool = False) -> None:
        if not self.procs:
            return
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
        self.procs = []


_GRIDS: dict = {}


class GroupPool:
    """Process groups shared by the grids one worker builds: a layout's grid is built once, but the session
    builds dozens, and each Gloo group keeps a network thread that wakes every 10 ms (140 groups cost a
    process 0.22 of a core while idle). `for_grid()` is the new_group of one ProcessGrid: its n-th request
    for some ranks gets the pool's n-th group over them, so no grid gets one group for two axes its own
    rules keep apart. Every rank builds the same grids in the same order, so all of them find a group or
    all make it: new_group is a collective over the world."""

    def __init__(self):
        self.groups: dict = {}

    def for_grid(self):
        import torch.distributed as dist

        asked: dict = {}

        def new_group(ranks, **options):
            nth = asked[tuple(ranks)] = asked.get(tuple(ranks), -1) + 1
            key = (tuple(ranks), nth, tuple(sorted(options.items())))
            if key not in self.groups:
                self.groups[key] = dist.new_group(ranks, **options)
            return self.groups[key]

        return new_group


_POOL = GroupPool()


def grid(**sizes):
    """A ProcessGrid per layout, built once per worker with groups pooled across the worker's grids
    (group creation is a world-wide collective)."""
    from parallel.grid import ProcessGrid

    # Sizes of 1 are the defaults: grid(tp=2) and grid(tp=2, ep=1) are the same layout; so is a dp_shard
    # of the whole dp x cp group (-1).
    if sizes.get("dp_shard") == sizes.get("dp", -1) * sizes.get("cp", 1):
        sizes["dp_shard"] = -1
    if sizes.get("dp_shard") == -1:
        del sizes["dp_shard"]
    key = tuple(sorted((k, v) for k, v in sizes.items() if v != 1 or k in ("dp", "dp_shard")))
    if key not in _GRIDS:
        _GRIDS[key] = ProcessGrid(**sizes, new_group=_POOL.for_grid())
    return _GRIDS[key]


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository root, importing this checkout, single-threaded (tests run the
    real command line in a subprocess); `env` adds variables."""
    env = {**os.environ, "PYTHONPATH": repo_root(), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=repo_root()
    )


def main_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """dtrain's command line in this process, as run_python runs it but without an interpreter and torch
    to start (seconds each): exit status, stdout, stderr. Paths in `argv` are taken from the test's cwd."""
    from dtrain import cli

    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

"""`dtrain` with faults injected, for tests that run it under real torchrun:

    torchrun ... -m tests.fault_inject [--fault ATTEMPT:RANK:KIND:STEP[:FILE]]... -- train CONFIG [k=v ...]

Each fault fires only in torchrun attempt ATTEMPT (TORCHELASTIC_RESTART_COUNT, which torchrun sets for its
workers: 0 first, 1 after the first restart) and on global rank RANK, so a restarted job runs clean:

    kill   SIGKILL this rank in the middle of step STEP: after its forward/backward and gradient
           reduction, before the optimizer step (the others are then waiting in a collective)
    save   SIGKILL this rank while it writes FILE (default: its model part) of checkpoint step_STEP,
           after writing half of the file's bytes
    stall  sleep for an hour at the start of step STEP, so the other ranks time out in a collective

The product code has no fault-injection switch: this wrapper patches the trainer and the checkpoint
writer in its own process only, then runs the ordinary command line.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import time


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(faults: list[str]) -> None:
    import torch.distributed as dist

    from dtrain import checkpoint
    from dtrain.trainer import Trainer

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    mine = []
    for spec in faults:
        when, rank, kind, step, *file = spec.split(":")
        if int(when) == attempt:
            mine.append((int(rank), kind, int(step), file[0] if file else None))
    if not mine:
        return

    def for_me(kind: str, step: int):
        return [f for f in mine if f[0] == dist.get_rank() and f[1] == kind and f[2] == step]

    sum_loss, train_step = Trainer._sum_loss, Trainer.train_step

    def mid_step(self, loss_sum):
        # The loss sum of a training step comes after its backward and gradient reduction and before the
        # optimizer step (evaluation sums its loss with the model in eval mode).
        if self.model.modules.training and for_me("kill", self.step + 1):
            print(f"fault_inject: killing rank {dist.get_rank()} in step {self.step + 1}", flush=True)
            _die()
        return sum_loss(self, loss_sum)

    def stalling_step(self):
        if for_me("stall", self.step + 1):
            print(f"fault_inject: stalling rank {dist.get_rank()} in step {self.step + 1}", flush=True)
            time.sleep(3600)
        return train_step(self)

    Trainer._sum_loss, Trainer.train_step = mid_step, stalling_step

    write_file = checkpoint._write_file

    def torn_write(path: str, write) -> None:
        folder, name = os.path.split(path)
        for _, _, step, file in (f for f in mine if f[0] == dist.get_rank() and f[1] == "save"):
            wanted = name == file if file else name.startswith("model_pp")
            if wanted and os.path.basename(folder) == f"step_{step}.tmp":
                buf = io.BytesIO()
                write(buf)
                data = buf.getvalue()
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                print(f"fault_inject: killing rank {dist.get_rank()} while writing {path}", flush=True)
                _die()
        write_file(path, write)

    checkpoint._write_file = torn_write


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.fault_inject")
    ap.add_argument("--fault", action="append", default=[], help="ATTEMPT:RANK:KIND:STEP[:FILE]")
    ap.add_argument("dtrain_args", nargs=argparse.REMAINDER, help="-- then the dtrain command line")
    args = ap.parse_args()
    argv = args.dtrain_args[1:] if args.dtrain_args[:1] == ["--"] else args.dtrain_args
    install(args.fault)
    from dtrain.cli import main as dtrain_main

    dtrain_main(argv)


if __name__ == "__main__":
    main()

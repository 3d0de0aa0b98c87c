"""Run outputs written by global rank 0: metrics.jsonl (one object per optimizer step), TensorBoard event
files in the same folder, and a progress line on stdout every `log_every` steps."""

from __future__ import annotations

import json
import os
import time


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, out_dir: str, total_steps: int, log_every: int, resume_step: int = 0, enabled=True):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = log_every
        self.start_step = resume_step
        self.start_time = time.perf_counter()
        self.interval = [0, 0.0]  # tokens and step seconds since the last progress line
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and rank 0 only

        self.tb = SummaryWriter(log_dir=out_dir, purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so metrics.jsonl reads as one run."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except ValueError:  # a line torn by a crash mid-write
                    continue
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        self.interval[0] += record["tokens_per_s"] * record["step_time_s"]
        self.interval[1] += record["step_time_s"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(key.replace("_", "/", 1) if key.startswith("val_") else key, value, step)
            elif isinstance(value, list):  # one curve per rank or per expert
                item = "rank" if key in ("peak_mem_mb", "comm_bytes_per_rank") else "expert"
                for j, v in enumerate(value):
                    self.tb.add_scalar(f"{key}/{item}{j}", v, step)
        if step % self.log_every == 0 or step == self.total_steps:
            print(self.progress_line(record), flush=True)
            self.interval = [0, 0.0]

    def progress_line(self, r: dict) -> str:
        done = r["step"] - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total_steps - r["step"])
        parts = [
            f"step {r['step']}/{self.total_steps}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.2e}",
            f"grad_norm {r['grad_norm']:.3f}",
            # Over the steps since the last line: one step's rate would be noisy, and logging steps also
            # run the communication ledger (parallel.ledger), which slows small models down.
            f"{self.interval[0] / max(self.interval[1], 1e-9):,.0f} tok/s",
        ]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if "val_loss" in r:
            parts.append(f"val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f})")
        parts.append(f"ETA {_format_duration(eta)}")
        return " | ".join(parts)

    def sample(self, step: int, prompt: str, text: str) -> None:
        """A generated continuation: one line on stdout (JSON-quoted, so newlines stay on it) and a
        TensorBoard text entry."""
        if self.enabled:
            print(f"sample at step {step}: {json.dumps(prompt, ensure_ascii=False)} -> "
                  f"{json.dumps(text, ensure_ascii=False)}", flush=True)  # fmt: skip
            self.tb.add_text("sample", prompt + text, step)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()

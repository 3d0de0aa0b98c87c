"""The example of docs/library.md runs as written under torchrun: the page shows examples/llama_zero3.py
verbatim, two ranks train it on the CPU, the loss falls, and the checkpoint it writes loads into a plain
LlamaForCausalLM in this one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests import harness

ROOT = Path(harness.repo_root())
EXAMPLE = ROOT / "examples" / "llama_zero3.py"


def test_the_page_shows_the_example_verbatim():
    page = (ROOT / "docs" / "library.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)
    assert EXAMPLE.read_text() in blocks


def test_the_example_trains_under_torchrun_and_its_checkpoint_loads_into_the_plain_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*command, str(EXAMPLE)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"^step \d+ loss (\S+)", out.stdout, re.M)]
    assert len(losses) == 8, out.stdout
    assert losses[-1] < 0.8 * losses[0], losses

    import transformers

    state = torch.load(tmp_path / "llama_zero3.pt")
    # The config of the example.
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state["model"])
    assert set(state["optimizer"]) == {name for name, _ in model.named_parameters()}

"""Every command of README.md, pasted in order into a shell with the environment activated, succeeds: the
README cannot drift from the code. Runs are shortened (train.steps=4, one timed benchmark step) and the
Hugging Face example gets a small local folder for its MODEL; nothing else is changed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests import harness, hf_models

README = os.path.join(harness.repo_root(), "README.md")
STEPS = 4


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def shortened(block: str, model: str) -> str:
    """The block as a user pastes it after set-up, with shorter runs."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        if "-m pytest" in line:
            continue  # the test suite itself
        line = line.replace("python3 scripts/setup.py && ", "")  # done: this is the suite it installed
        if line.startswith("MODEL="):
            line = f"MODEL={model}"
        command = line.split(" # ")[0].rstrip()
        if re.search(r"-m launch |dtrain train |-m dtrain train ", command):
            command += f" train.steps={STEPS}"
        if command.startswith("dtrain bench "):
            command += " --steps 1 --warmup 1"
        command = re.sub(r"step_(100|200)\b", f"step_{STEPS}", command)
        lines.append(command)
    return "\n".join(lines)


def test_readme_commands_run_as_pasted(tmp_path):
    root = harness.repo_root()
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("configs", "scripts", ".venv"):  # what a fresh clone plus set-up has at its root
        if os.path.exists(os.path.join(root, name)):
            os.symlink(os.path.join(root, name), work / name)
    model = hf_models.make(str(tmp_path / "hf-model"), "llama-tied-llama3-rope")
    venv_bin = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # `. .venv/bin/activate`
        "PYTHONPATH": root,
        "OMP_NUM_THREADS": "1",
    }
    with open(README, encoding="utf-8") as f:
        blocks = bash_blocks(f.read())
    assert len(blocks) >= 3, "the README lost its command blocks"
    for block in blocks:
        script = shortened(block, model)
        result = subprocess.run(
            ["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{script}\n--- stderr:\n{result.stderr[-3000:]}"
    assert (work / "model.pt").is_file() and (work / "timeline.png").is_file()
    assert (work / "runs" / "finetune" / "hf" / "config.json").is_file()

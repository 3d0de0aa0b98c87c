"""Every command of README.md and of the docs, pasted in order into a shell with the environment
activated, succeeds: neither can drift from the code. Runs are shortened (train.steps=4, one timed
benchmark step, two worlds and strong scaling only for the sweep), the Hugging Face examples get a small
local folder for their model and tokenizer, and the data files the examples name are generated; nothing
else is changed. The README runs in the default set (its examples on a Hugging Face folder in the slow
one), the docs after it in the slow set (they hold every benchmark). Only what one machine cannot run is
left out (SEVERAL_NODES)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests import harness, hf_models

ROOT = harness.repo_root()
STEPS = 4
DOCS = ["docs/running.md", "docs/estimate.md", "docs/reliability.md", "docs/benchmarks.md", "docs/testing.md"]
# Commands for several nodes or a cluster scheduler: a single test machine has neither.
SEVERAL_NODES = re.compile(r"--nnodes [2-9]|^sbatch |^export GLOO_SOCKET_IFNAME")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def shortened(block: str, model: str) -> str:
    """The block as a user pastes it after set-up, with shorter runs."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        if "-m pytest" in line or ".ci/run" in line or SEVERAL_NODES.search(line.strip()):
            continue  # the test suite itself (this test runs inside it); several nodes
        line = line.replace("python3 scripts/setup.py && ", "")  # done: this is the suite it installed
        line = re.sub(r"^\s*MODEL=\S+", f"MODEL={model}", line)
        line = re.sub(r"(?<![\w.-])/?models/[\w.-]+", model, line)  # "a local Hugging Face folder"
        command = line.split(" # ")[0].rstrip()
        if not command or command.startswith("#"):
            continue
        if re.search(r"-m launch |dtrain train |-m dtrain train ", command):
            command += f" train.steps={STEPS}"
        if re.search(r"^dtrain bench |-m dtrain\.bench\.", command):
            command = command.replace("--worlds 1,2,4", "--worlds 1,2").replace(
                "--train-steps 40", "--train-steps 2"
            )
            command += " --steps 1 --warmup 1"
            if re.search(r"^dtrain bench |dtrain\.bench\.scaling", command) and "--mode" not in command:
                command += " --mode strong"  # one scaling mode; both share all the code
        command = re.sub(r"step_(100|200)\b", f"step_{STEPS}", command)
        lines.append(command)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkout after set-up, as seen from its root with `. .venv/bin/activate` done."""
    tmp = tmp_path_factory.mktemp("pasted")
    work = tmp / "checkout"
    work.mkdir()
    for name in ("configs", "scripts", "launch", ".venv", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            os.symlink(os.path.join(ROOT, name), work / name)
    model = str(tmp / "hf-model")  # made by run_page for the first command that names it
    # The data files the fine-tuning examples name, generated: plain text, documents, instructions, chats.
    lines = [hf_models.sample_text(20, i) for i in range(60)]
    (work / "corpus.txt").write_text("\n".join(lines))
    jsonl = {
        "docs.jsonl": [{"text": t} for t in lines],
        "sft.jsonl": [{"prompt": t[:30], "response": t[30:]} for t in lines],
        "chats.jsonl": [{"messages": [{"role": "user", "content": t[:30]},
                                      {"role": "assistant", "content": t[30:]}]} for t in lines],
    }  # fmt: skip
    for name, records in jsonl.items():
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": ROOT,
        "OMP_NUM_THREADS": "1",
    }
    return work, model, env


def run_page(page: str, workspace, which=lambda block: True) -> None:
    work, model, env = workspace
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        blocks = [b for b in bash_blocks(f.read()) if which(b)]
    for block in blocks:
        script = shortened(block, model)
        if not script:
            continue
        if model in script and not os.path.exists(model):
            hf_models.make_tokenizer(hf_models.make(model, "llama-tied-llama3-rope"))
        result = subprocess.run(
            ["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1800
        )
        assert result.returncode == 0, f"{page}:\n{script}\n--- stderr:\n{result.stderr[-3000:]}"


def from_a_hugging_face_folder(block: str) -> bool:
    return "MODEL=" in block


def test_readme_commands_run_as_pasted(workspace):
    """Set-up, the default job and the tour; the examples on a Hugging Face folder run in the slow set
    (their commands are the same ones test_hf_cli, test_finetune_data and test_lora_cli run)."""
    run_page("README.md", workspace, lambda block: not from_a_hugging_face_folder(block))
    work = workspace[0]
    assert (work / "model.pt").is_file() and (work / "timeline.png").is_file()


@pytest.mark.slow
def test_readme_examples_on_a_hugging_face_folder_run_as_pasted(workspace):
    run_page("README.md", workspace, from_a_hugging_face_folder)
    work = workspace[0]
    assert (work / "runs" / "finetune" / "hf" / "config.json").is_file()
    assert (work / "runs" / "lora" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_docs_commands_run_as_pasted_after_the_readme(workspace):
    if not (workspace[0] / "model.pt").exists():  # run alone: the docs continue from the default job's state
        run_page("README.md", workspace, lambda block: not from_a_hugging_face_folder(block))
    for page in DOCS:
        run_page(page, workspace)

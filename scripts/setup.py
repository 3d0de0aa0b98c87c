"""Idempotent set-up: a virtual environment with the right torch build and dtrain installed (editable).

    python3 scripts/setup.py [--torch auto|cpu|cuda|skip] [--venv PATH]

Creates the venv (default: .venv in the repository root) when missing, installs torch 2.13.0 (the CPU
build, or the CUDA build when an NVIDIA driver is present) unless a matching one is already there, then
`pip install -e ".[test]"`, which is skipped while pyproject.toml is unchanged. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys

TORCH = "2.13.0"
CPU_INDEX = [
    "--index-url",
    "https://download.pytorch.org/whl/cpu",
    "--extra-index-url",
    "https://pypi.org/simple",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SetupError(Exception):
    pass


def say(msg: str) -> None:
    print(f"setup: {msg}", flush=True)


def run(cmd: list[str], what: str) -> None:
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0:
        raise SetupError(f"{what} failed (exit {code}); see the output above")


def nvidia_driver() -> bool:
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    smi = shutil.which("nvidia-smi")
    try:
        return smi is not None and subprocess.run([smi], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def installed_version(python: str, dist: str) -> str | None:
    """The version of a distribution in the venv, read from its metadata (no import, so it is fast)."""
    code = f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept Exception: pass"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or None


def install_torch(python: str, kind: str) -> None:
    have = installed_version(python, "torch")
    base, _, label = (have or "").partition("+")
    if base == TORCH and (kind == "cpu" or label != "cpu"):
        say(f"torch {have} already installed")
        return
    pip = [python, "-m", "pip", "install"]
    if kind == "cuda" or sys.platform == "darwin":
        # `===` is an exact string match: it skips 2.13.0+cpu wheels that a find-links folder may offer and
        # takes the PyPI build, which is the CUDA one on Linux (and the only one on macOS).
        say(
            f"installing torch {TORCH} ({'CUDA' if kind == 'cuda' else 'macOS'} build from the default index)"
        )
        run([*pip, f"torch==={TORCH}"], "pip install torch")
        return
    spec = f"torch=={TORCH}+cpu"
    say(f"installing torch {TORCH}+cpu")
    # The configured indexes first: fast where a local wheel or a mirror has it (PyPI does not).
    if subprocess.run([*pip, "-q", spec], cwd=ROOT, capture_output=True).returncode != 0:
        say("not in the configured indexes; trying download.pytorch.org/whl/cpu")
        run([*pip, spec, *CPU_INDEX], "pip install torch (CPU build)")


def install_project(python: str, venv: str) -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        stamp = hashlib.sha256(f.read() + ROOT.encode()).hexdigest()
    stamp_file = os.path.join(venv, ".dtrain-setup")
    if os.path.exists(stamp_file) and installed_version(python, "dtrain"):
        with open(stamp_file) as f:
            if f.read().strip() == stamp:
                say("dtrain already installed (pyproject.toml unchanged)")
                return
    say('installing dtrain (pip install -e ".[test]")')
    run([python, "-m", "pip", "install", "-q", "-e", ".[test]"], "pip install -e .[test]")
    with open(stamp_file, "w") as f:
        f.write(stamp + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--torch",
        choices=("auto", "cpu", "cuda", "skip"),
        default="auto",
        help="which torch build to install (auto: cuda when an NVIDIA driver is present)",
    )
    parser.add_argument(
        "--venv", default=os.path.join(ROOT, ".venv"), help="virtual environment (default .venv)"
    )
    args = parser.parse_args()
    if sys.version_info < (3, 10):  # noqa: UP036 (the venv inherits this interpreter)
        raise SetupError(
            f"Python >= 3.10 is needed, this is {sys.version.split()[0]}; run it with a newer python3"
        )
    venv = os.path.abspath(args.venv)
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(venv):
        say(f"creating {os.path.relpath(venv, ROOT) if venv.startswith(ROOT) else venv}")
        run(
            [sys.executable, "-m", "venv", venv],
            "python3 -m venv (on Debian/Ubuntu: apt install python3-venv)",
        )
    elif not os.path.exists(python):
        raise SetupError(f"{venv} exists but has no bin/python; remove it and run this again")
    kind = args.torch
    if kind == "auto":
        kind = "cuda" if nvidia_driver() else "cpu"
    if kind == "skip":
        say("leaving torch alone (--torch skip)")
    else:
        install_torch(python, kind)
    install_project(python, venv)
    say("ready")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SetupError as e:
        print(f"setup: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

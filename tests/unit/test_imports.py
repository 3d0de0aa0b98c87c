"""parallel/ is a library of its own: it and its unit tests import nothing from dtrain."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from tests import harness

HERE = pathlib.Path(__file__).parent


def test_parallel_and_its_unit_tests_import_nothing_from_dtrain():
    modules = ["parallel." + p.stem for p in (HERE.parent.parent / "parallel").glob("*.py")]
    modules += ["tests.unit." + p.stem for p in HERE.glob("test_*.py")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'dtrain' or m.startswith('dtrain.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=harness.repo_root(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""The package's import layering (import-linter contracts in pyproject.toml) and the lint and format rules (ruff)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's scripts, beside its python
CHECKED = ["src", "tests", "benchmarks"]


def _run(*command: str) -> subprocess.CompletedProcess:
    tool = BIN / command[0]
    if not tool.exists():
        pytest.fail(f"{tool} not found: install the test extra (pip install -e '.[test]')")
    return subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _passes(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]  # the end holds the summary


def test_import_contracts_hold():
    _passes(_run("lint-imports", "--no-cache"))


def test_ruff_lint_passes():
    _passes(_run("ruff", "check", "--no-cache", *CHECKED))


def test_ruff_format_is_applied():
    _passes(_run("ruff", "format", "--check", "--no-cache", *CHECKED))

"""The house style is checked, not hoped for: ruff and mypy (strict on the crypto
layer and the codec) run as part of the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_clean() -> None:
    if _run(sys.executable, "-m", "ruff", "--version").returncode:
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    out = _run(sys.executable, "-m", "ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_clean() -> None:
    if _run(sys.executable, "-m", "mypy", "--version").returncode:
        pytest.skip("mypy is not installed (it comes with the dev extra)")
    out = _run(sys.executable, "-m", "mypy", "protogalaxy")
    assert out.returncode == 0, out.stdout + out.stderr

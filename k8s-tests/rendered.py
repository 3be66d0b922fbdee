"""The chart as ``helm template`` renders it, run as local processes: a driver for
the scenarios where there is no Kubernetes cluster (issue 13).

:class:`RenderedDriver` renders ``charts/`` with ``values-kind.yaml`` and the same
value mapping as the kube driver (``drivers._VALUES``), parses every document and
plays the parts of the API server, the controllers and the kubelet that the chart
relies on, on this machine:

* **Objects.** ConfigMaps and Secrets (``data`` base64, ``stringData``,
  ``binaryData``) are kept as the store env and volumes are resolved from.
  Services get a loopback port for each of their ports and a proxy there that
  routes round-robin, per connection, to the Ready pods their selector matches
  (an Endpoints list: a pod that is not Ready, or is terminating, gets nothing; a
  Service with no endpoint closes the connection). So ``galaxies.replicas > 1`` is
  supported: each replica is a pod behind its Service. Deployments, StatefulSets
  and Jobs are controllers of pods (below). ServiceAccount, Role, RoleBinding,
  NetworkPolicy, PodDisruptionBudget and ServiceMonitor are recorded in
  :attr:`RenderedDriver.skipped` and not acted on, each for the reason in
  :data:`SKIPPED`. Any other kind raises :class:`Unsupported`: the driver never
  ignores what it does not understand.
* **Hooks.** ``pre-install``/``pre-upgrade`` (then ``post-*``) hooks run in
  helm's order (weight, kind, name); a hook Job runs to completion under the Job
  rules below, or the install fails with its log. The key hook talks to the
  Kubernetes API: a hook container whose env names ``PG_KEY_SECRET`` gets
  ``PG_KEYGEN_DIR`` (``services/keygen.py``'s local mode) pointing at a directory
  that outlives releases as the Secret does, and the driver makes the Secret
  ``$PG_KEY_SECRET`` from the files there. ``helm test`` hooks are what
  :meth:`RenderedDriver.check_install` runs.
* **Pods.** Each Deployment replica, StatefulSet replica and Indexed Job pod is a
  process group. A container without ``command`` runs the image's ENTRYPOINT,
  ``python -m protogalaxy.services`` (Dockerfile; this interpreter, in the
  repository) with the
  container's ``args``; a container with ``command`` runs it with the local binary
  (``python`` is this interpreter, ``redis-server`` the installed one). The
  environment is the image's (``PYTHONUNBUFFERED``, ``PG_HOST``, ``PG_PORT``) and
  ``PATH``/``HOME``/``LANG`` of this machine, then the Service links Kubernetes
  injects (``<SVC>_SERVICE_HOST``, ``<SVC>_PORT``, ... for every Service with a
  cluster IP, unless ``enableServiceLinks: false``), then ``envFrom`` and ``env``:
  ``value``, ``valueFrom.secretKeyRef``/``configMapKeyRef`` from the store,
  ``fieldRef`` (``metadata.namespace/name/uid/labels/annotations``,
  ``status.podIP``, ``spec.nodeName``, ``spec.serviceAccountName``), with
  Kubernetes' ``$(VAR)`` expansion of earlier entries (``$$`` escapes) in env,
  command and args. A reference to a missing Secret or ConfigMap (or key) leaves
  the pod in ``CreateContainerConfigError`` until it appears, as the kubelet does.
  stdout and stderr go to ``<workdir>/logs/<pod>.log``; what the controllers and
  the kubelet do goes to ``<workdir>/events.log``.
* **Volumes.** configMap and secret volumes become files in a per-pod directory
  (``items``, ``defaultMode`` and ``mode`` honoured), rewritten in running pods
  when the object changes, as the kubelet syncs them; ``emptyDir`` is a per-pod
  directory; a PVC (``volumeClaimTemplates`` or ``persistentVolumeClaim``) is a
  per-claim directory under ``<workdir>/cluster/pvc/`` that outlives pods,
  restarts and upgrades. ``subPath`` is honoured.
* **Controllers.** Deployments roll (``RollingUpdate``: new pods first, up to
  ``maxSurge``, an old one stopped for each new one Ready within
  ``maxUnavailable``; or ``Recreate``). StatefulSets start ordinals in order,
  each once the one before is Ready, and update by stopping a pod, then starting
  its replacement, from the highest ordinal. Jobs run ``completions`` pods with
  at most ``parallelism`` at once (Indexed: ``JOB_COMPLETION_INDEX`` and the
  ``batch.kubernetes.io/job-completion-index`` label, lowest pending index
  first; the next index starts when one succeeds); ``restartPolicy: OnFailure``
  restarts a failed container in its pod, ``Never`` replaces the pod; every
  container restart, failed pod and deleted pod counts against ``backoffLimit``,
  and past it the Job fails and its pods are stopped.
* **Kubelet.** ``startupProbe``, ``livenessProbe`` and ``readinessProbe``
  (``httpGet``, ``exec``, ``tcpSocket``) run on their ``initialDelaySeconds``,
  ``periodSeconds``, ``timeoutSeconds``, ``failureThreshold`` and
  ``successThreshold``; liveness and readiness wait for the startup probe. A pod
  is Ready after its readiness probe succeeds (at start without one). A failed
  startup or liveness probe kills the container (SIGTERM to its main process,
  SIGKILL to its process group after ``terminationGracePeriodSeconds``), and
  containers restart under ``restartPolicy`` with the kubelet's back-off (10 s,
  doubling, at most 300 s). Init containers run first, in order.
* **Install and upgrade.** Objects are applied after the pre-hooks, then the
  driver waits as ``helm --wait`` does (every Deployment and StatefulSet rolled
  out and Ready; Jobs are not waited for), or fails as soon as a pod it waits for
  has crashed three times, with that pod's log. :meth:`RenderedDriver.upgrade`
  renders again (``--is-upgrade``), runs the pre-upgrade hooks, replaces the pods
  of each workload whose pod template changed (above), starts new objects,
  deletes objects no longer rendered (their pods stopped; PVC directories stay)
  and leaves unchanged ones running. A Job rendered again under its name with a
  different template, completions or selector is refused as the API server
  refuses it (``field is immutable``), before anything is applied.

What differs from a cluster, and so is rewritten (these are all the rewrites):

1. **Listening addresses.** Every pod shares this machine's loopback, so a
   container that declares ports and runs the image's entrypoint gets
   ``PG_HOST=127.0.0.1`` and ``PG_PORT=<its own loopback port>`` (after its env,
   when the port it would listen on is a number; otherwise the value is left for
   the app to refuse, as it would in a pod), and ``redis-server`` gets its
   ``--port`` value replaced and ``--bind 127.0.0.1`` appended. In exec probes,
   ``-p N``/``--port N`` for a port the container listens on becomes its loopback
   port (the probe runs "inside the pod"). Probes and Services reach the pod at
   that port through the port it listens on in the container.
2. **Service DNS.** Each Service gets a loopback address of its own in
   127.0.0.0/8 (its "cluster IP") and listens there at its own ports, so a URL
   keeps its port. The chart builds Service names at run time (the clients'
   ``PG_GALAXY_URL_TEMPLATE`` is ``http://<release>-galaxy-{galaxy}:8000``), which
   no rewrite of the rendered text could map, and asyncio clients (anyio) connect
   to the resolved address at the URL's own port. So names are resolved, not
   rewritten: every Python process gets ``PYTHONPATH=<workdir>/cluster/dns``,
   whose ``sitecustomize`` makes ``socket.getaddrinfo`` answer ``<svc>``,
   ``<svc>.<ns>``, ``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.cluster.local`` with the
   Service's address (from ``dns.json`` there, read again when it changes). A
   name shaped like a cluster name (one label, or ending in ``.<ns>``, ``.svc``,
   ``.svc.cluster.local``) that is no Service fails to resolve, and a port the
   Service does not expose refuses the connection, as in a cluster. A non-Python
   command whose args name a Service is refused (:class:`Unsupported`). Service
   links carry the Service's address and ports.
3. **Paths.** A path in env values, command, args and exec probes that starts with
   a ``mountPath`` of the container is rewritten to that volume's local
   directory; when a volume is mounted at ``/tmp``, ``TMPDIR`` points at it.
   The working directory is the repository (the image's ``/app`` holds nothing
   the code reads).

Not emulated: resources and limits (so torch sizes its threads from this
machine's CPUs, as it does in a pod without a CPU limit), securityContext (no
read-only root file system, no other user), scheduling (nodeSelector,
tolerations, affinity, GPUs), RBAC, NetworkPolicies, the image's contents beyond
its entrypoint. Every connection reaches a pod from 127.0.0.1 (the proxy), so
per-peer limits count all peers as one. ``helm template`` cannot ``lookup``: a
value that differs between two renders of the same values (a generated password)
is kept from the previous apply, in every Secret that holds it as it is or as its
SHA-256 (a Redis ACL), as ``lookup`` keeps it; an annotation that differs
between two renders (a checksum of such a Secret) keeps its previous value unless
one of those Secrets changed, so pods roll when the Secret really changed and not
otherwise. ``helm template`` renders
``.Release.Revision`` 1 every time, so a chart that derives the run from the
revision sees the same run after an upgrade (and its client Job, renamed by
nothing, is then refused as immutable). Where the chart looks the run's family
up from the ConfigMap ``<fullname>-run`` (key ``family``), an upgrade passes
``--set-string run.id=<that family>`` from the previous render, as the lookup
would find it, unless the scenario sets ``run.id`` itself; the run id is then
``<family>-<hash of the run's config>``, so an upgrade that keeps the config
continues the run and one that changes it starts a new one, as in a cluster,
except that a config that comes back gets its old id back here (a cluster draws a
new suffix).

The restarts the scenarios ask for: :meth:`RenderedDriver.restart_global` kills
the global pod at once (grace 0: SIGKILL) and waits for the StatefulSet's new pod
(a new uid) to be Ready; :meth:`RenderedDriver.restart_client_pod` deletes the
client pod of a completion index with its grace period, as ``kubectl delete pod``
does, and the Job starts a replacement (the deletion counts as a failure against
``backoffLimit``, and the replacement waits the Job's back-off, 10 s).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from drivers import (
    _VALUES,
    BASE,
    CHART,
    CLIENTS_SEEN_PY,
    ROOT,
    Driver,
    parse_events,
)

from protogalaxy.services.up import _ephemeral_ports

__all__ = ["RenderedDriver", "Unsupported", "render"]

VALUES_KIND = ROOT / "k8s-tests" / "values-kind.yaml"

#: Kinds recorded and skipped, and why nothing here needs to act on them.
SKIPPED = {
    "ServiceAccount": "no API server: nothing authenticates as it",
    "Role": "no API server to authorize against (RBAC is checked statically)",
    "RoleBinding": "no API server to authorize against (RBAC is checked statically)",
    "NetworkPolicy": "no CNI: every process shares the loopback (the policies are "
    "checked statically in tests/deploy)",
    "PodDisruptionBudget": "nothing evicts pods here",
    "ServiceMonitor": "no Prometheus operator",
}

#: helm's install order of kinds, for hooks of equal weight
_KIND_ORDER = [
    "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret",
    "SecretList", "ConfigMap", "StorageClass", "PersistentVolume",
    "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role",
    "RoleList", "RoleBinding", "RoleBindingList", "Service", "DaemonSet", "Pod",
    "ReplicationController", "ReplicaSet", "Deployment", "HorizontalPodAutoscaler",
    "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
]  # fmt: skip

_HOOKS_RUN = {"pre-install", "post-install", "pre-upgrade", "post-upgrade", "test"}
#: hooks of operations the driver never performs (uninstall, rollback)
_HOOKS_NEVER = {"pre-delete", "post-delete", "pre-rollback", "post-rollback"}

_IMAGE_ENV = {  # the Dockerfile's ENV
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PG_HOST": "0.0.0.0",
    "PG_PORT": "8000",
}

_BACKOFF_S, _BACKOFF_MAX_S = 10.0, 300.0
#: crashes of a pod that install/upgrade wait for before they give up on it
CRASHES = 3
#: the ranges of a Service address's last three octets (127.<a>.<b>.<c>)
_OCTETS = ((2, 255), (0, 256), (1, 255))
_TICK_S = 0.2


class Unsupported(ValueError):
    """A rendered object or field this driver does not understand."""


class _Missing(Exception):
    """A Secret, ConfigMap or key a pod refers to does not exist (yet)."""


# -- pure helpers -------------------------------------------------------------------


def render(
    helm: str,
    *,
    release: str,
    namespace: str,
    sets: list[str],
    upgrade: bool = False,
    values: Path = VALUES_KIND,
) -> list[dict[str, Any]]:
    """``helm template`` of the chart: every document, parsed. ``RuntimeError``
    with helm's message when the chart refuses to render."""
    argv = [
        helm, "template", release, str(CHART), "-n", namespace, "-f", str(values),
        *sets,
    ]  # fmt: skip
    if upgrade:
        argv.append("--is-upgrade")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"helm template refused: {done.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise Unsupported(f"a rendered document is not an object: {d!r:.200}")
    return docs


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined variable is replaced, an
    undefined reference stays as written, ``$$`` is a literal ``$``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$" or i + 1 == len(text):
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(c + nxt)
            i += 2
    return "".join(out)


def secret_data(obj: dict[str, Any]) -> dict[str, bytes]:
    """A Secret's keys and values (``data`` is base64, ``stringData`` wins)."""
    out = {k: base64.b64decode(v or "") for k, v in (obj.get("data") or {}).items()}
    out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def configmap_data(obj: dict[str, Any]) -> dict[str, bytes]:
    out = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
    out.update(
        {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    )
    return out


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Service's ``selector`` or a workload's ``matchLabels``/
    ``matchExpressions`` against a pod's labels (an empty selector matches none,
    as a Service without a selector gets no endpoints)."""
    if not selector:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match = selector.get("matchLabels") or {}
        for expr in selector.get("matchExpressions") or []:
            key, op, vals = expr["key"], expr["operator"], expr.get("values") or []
            ok = {
                "In": labels.get(key) in vals,
                "NotIn": labels.get(key) not in vals,
                "Exists": key in labels,
                "DoesNotExist": key not in labels,
            }.get(op)
            if ok is None:
                raise Unsupported(f"selector operator {op!r}")
            if not ok:
                return False
    else:
        match = selector
    return all(labels.get(k) == str(v) for k, v in match.items())


def digest(obj: Any, n: int = 10) -> str:
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:n]


def differing_paths(a: Any, b: Any, path: tuple[Any, ...] = ()) -> set[tuple[Any, ...]]:
    """Paths of the scalars where ``a`` and ``b`` (two renders) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple[Any, ...]] = set()
        for k in set(a) | set(b):
            out |= differing_paths(a.get(k), b.get(k), (*path, k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = set()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out |= differing_paths(x, y, (*path, i))
        return out
    return set() if a == b else {path}


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        if isinstance(obj, dict):
            obj = obj.get(p)
        elif isinstance(obj, list) and isinstance(p, int) and p < len(obj):
            obj = obj[p]
        else:
            return None
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def rewrite_paths(text: str, mounts: list[tuple[str, Path]]) -> str:
    """Paths under a ``mountPath`` become paths under its local directory (in one
    pass, the longest mount path first: a rewritten path is never rewritten
    again)."""
    if not mounts:
        return text
    local = {m.rstrip("/") or "/": str(p) for m, p in mounts}
    alternatives = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
    pattern = r"(?<![\w.\-/])(" + alternatives + r")(?=/|$|[^\w.\-])"
    return re.sub(pattern, lambda m: local[m.group(1)], text)


def rewrite_port_flags(text: str, ports: dict[int, int]) -> str:
    """``-p N``/``--port N``/``--port=N`` for a port in ``ports`` -> its local port."""

    def sub(m: re.Match[str]) -> str:
        port = int(m.group(3))
        return m.group(1) + m.group(2) + str(ports.get(port, port))

    return re.sub(r"(?<!\S)(-p|--port)(\s+|=)(\d+)(?!\S)", sub, text)


def _kube_name(prefix: str) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for suffixes
    return prefix + "-" + "".join(random.choice(alphabet) for _ in range(5))


def _env_name(service: str) -> str:
    return service.upper().replace("-", "_").replace(".", "_")


_SITECUSTOMIZE = '''\
"""Cluster DNS for a process of the rendered-chart driver (k8s-tests/rendered.py):
Service names resolve to the loopback address the driver gave the Service."""
import json as _json
import os as _os
import socket as _socket

_TABLE = _os.path.join(_os.path.dirname(__file__), "dns.json")
_state = {"mtime": None, "table": {}}
_resolve = _socket.getaddrinfo


def _load():
    try:
        mtime = _os.stat(_TABLE).st_mtime_ns
    except OSError:
        return _state["table"]
    if mtime != _state["mtime"]:
        with open(_TABLE, encoding="utf-8") as f:
            _state["table"] = _json.load(f)
        _state["mtime"] = mtime
    return _state["table"]


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str):
        table = _load()
        key = name.lower().rstrip(".")
        address = table.get("names", {}).get(key)
        if address is not None:
            return _resolve(address, port, family, type, proto, flags)
        ns = table.get("namespace", "")
        clusterish = key not in ("localhost", _socket.gethostname().lower()) and (
            "." not in key
            or key.endswith(("." + ns, "." + ns + ".svc", ".svc", ".svc.cluster.local"))
        )
        if clusterish:
            raise _socket.gaierror(
                _socket.EAI_NONAME, f"{name}: no such Service in namespace {ns}"
            )
    return _resolve(host, port, family, type, proto, flags)


_socket.getaddrinfo = getaddrinfo
'''


# -- ports and Services ---------------------------------------------------------------


class _Ports:
    """Loopback ports below the ephemeral range (see services.up): a port found free
    there cannot be taken by an outgoing connection before its server binds it."""

    def __init__(self) -> None:
        self.taken: set[int] = set()
        self.addresses: set[str] = set()
        self.rng = random.Random()
        self.lock = threading.Lock()

    def take(self) -> int:
        top = min(_ephemeral_ports().start, 65536)
        low = 10000 if top > 11000 else 1024
        with self.lock:
            for _ in range(1000):
                port = self.rng.randrange(low, top)
                if port in self.taken:
                    continue
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", port))
                    except OSError:
                        continue
                self.taken.add(port)
                return port
        raise RuntimeError("no free loopback port below the ephemeral range")

    def address(self, ports: list[int]) -> str:
        """A loopback address of 127.0.0.0/8 (not 127.0.0.x or 127.0.1.x) where
        every one of ``ports`` is free: a Service's "cluster IP"."""
        with self.lock:
            for _ in range(100):
                a, b, c = (self.rng.randrange(lo, hi) for lo, hi in _OCTETS)
                ip = f"127.{a}.{b}.{c}"
                if ip in self.addresses:
                    continue
                try:
                    for port in ports:
                        with socket.socket() as s:
                            s.bind((ip, port))
                except OSError:
                    continue
                self.addresses.add(ip)
                return ip
        raise RuntimeError(
            f"no loopback address with the ports {ports} free (is something "
            "listening on 0.0.0.0 at one of them?)"
        )


@dataclass
class _ServicePort:
    name: str | None
    port: int
    target: int | str
    server: asyncio.AbstractServer | None = None
    turn: int = 0


@dataclass
class _Service:
    obj: dict[str, Any]
    ports: list[_ServicePort]
    #: its "cluster IP": a loopback address of its own, listening at its ports
    address: str

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def headless(self) -> bool:
        return bool(self.obj["spec"].get("clusterIP") == "None")


class _Proxies:
    """The Services' loopback ports: an asyncio loop in a thread that pipes each
    connection to the next Ready endpoint."""

    def __init__(self, endpoints: Callable[[str, _ServicePort], list[int]]) -> None:
        self.endpoints = endpoints
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="rendered-proxies", daemon=True
        )
        self.thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def open(self, service: str, address: str, sp: _ServicePort) -> None:
        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_server(
                lambda r, w: self._pipe(service, sp, r, w), address, sp.port
            )

        sp.server = self._call(start())

    def close(self, sp: _ServicePort) -> None:
        server = sp.server
        if server is None:
            return
        sp.server = None

        async def stop() -> None:
            server.close()
            if hasattr(server, "close_clients"):
                server.close_clients()

        self._call(stop())

    async def _pipe(
        self,
        service: str,
        sp: _ServicePort,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        ends = self.endpoints(service, sp)
        if not ends:
            writer.close()
            return
        sp.turn += 1
        port = ends[sp.turn % len(ends)]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return

        async def copy_(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                dst.close()

        try:
            await asyncio.gather(copy_(reader, up_writer), copy_(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    def stop(self) -> None:
        """Close every connection still piped, then the loop."""

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


# -- pods -----------------------------------------------------------------------------


@dataclass
class _Plan:
    """One container as this machine runs it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    ports: dict[int, int]  # port it listens on in the container -> loopback port
    named: dict[str, int]  # named container ports -> container port
    mounts: list[tuple[str, Path]]
    spec: dict[str, Any]


class _Pod:
    """A pod and its kubelet: a thread that starts its containers, probes them,
    restarts them under the restart policy and stops them when deleted."""

    def __init__(
        self,
        cluster: _Cluster,
        *,
        name: str,
        template: dict[str, Any],
        owner: tuple[str, str],
        revision: str,
        index: int | None = None,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        claims: dict[str, Path] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.uid = str(uuid.uuid4())
        self.template = copy.deepcopy(template)
        self.spec: dict[str, Any] = self.template.get("spec") or {}
        meta = self.template.get("metadata") or {}
        self.labels = {**(meta.get("labels") or {}), **(labels or {})}
        self.annotations = {**(meta.get("annotations") or {}), **(annotations or {})}
        self.owner = owner
        self.revision = revision
        self.index = index
        self.claims = claims or {}
        self.extra_env = extra_env or {}
        self.dir: Path = cluster.pod_dir(name)
        self.log = cluster.workdir / "logs" / f"{name}.log"
        self.ports: dict[int, int] = {}
        self.phase = "Pending"
        self.reason = ""
        self.ready = False
        self.restarts = 0
        self.exit_codes: list[int] = []
        self.deleting = False
        self.grace: float | None = None
        self.plan: _Plan | None = None
        self.volumes: dict[str, Path] = {}
        self.wake = threading.Event()
        self.done = threading.Event()
        self.created = time.monotonic()
        containers = self.spec.get("containers") or []
        if len(containers) != 1:
            raise Unsupported(
                f"pod {name}: {len(containers)} containers; the driver runs pods "
                "of exactly one container (plus init containers)"
            )
        for c in self.spec.get("initContainers") or []:
            if c.get("restartPolicy") == "Always":
                raise Unsupported(f"pod {name}: sidecar init container {c['name']}")
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- what the controllers see

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def live(self) -> bool:
        return not self.deleting and not self.finished

    def start(self) -> None:
        self.cluster.event(f"pod/{self.name}", f"created by {'/'.join(self.owner)}")
        self.thread.start()

    def delete(self, grace: float | None = None) -> None:
        """Begin deleting (as the API server marks it): no endpoint from now on;
        the kubelet thread stops the container with ``grace``."""
        if self.deleting:
            return
        self.grace = grace
        self.deleting = True
        self.ready = False
        self.wake.set()
        self.cluster.event(f"pod/{self.name}", f"deleted (grace {grace})")

    def termination_grace(self) -> float:
        if self.grace is not None:
            return self.grace
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    def local_port(self, container_port: int) -> int:
        if container_port not in self.ports:
            self.ports[container_port] = self.cluster.port_pool.take()
        return self.ports[container_port]

    # -- the kubelet

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless deleted meanwhile; False when deleted."""
        self.wake.wait(max(0.0, seconds))
        return not self.deleting

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception as exc:  # a bug, or something not understood: stop
            self.reason = f"driver error: {exc!r}"
            self.phase = "Failed"
            self.cluster.errors.append(f"pod {self.name}: {exc!r}")
            self.cluster.event(f"pod/{self.name}", self.reason)
        finally:
            self.ready = False
            if self.phase not in ("Succeeded", "Failed"):
                self.phase = "Terminated"
            self.done.set()
            self.cluster.pod_finished(self)

    def _lifecycle(self) -> None:
        policy = self.spec.get("restartPolicy", "Always")
        # Volumes first: a missing Secret or ConfigMap holds the pod here.
        while True:
            try:
                self.volumes = self.cluster.make_volumes(self)
                break
            except _Missing as exc:
                self._waiting(f"FailedMount: {exc}")
                if not self._sleep(2.0):
                    return
        for init in self.spec.get("initContainers") or []:
            while True:
                code = self._run_container(init, probes=False)
                if code is None:
                    return
                if code == 0:
                    break
                if policy == "Never":
                    self.phase = "Failed"
                    return
                if not self._backoff():
                    return
        (main,) = self.spec["containers"]
        while True:
            code = self._run_container(main, probes=True)
            if code is None:
                return
            if code == 0 and policy != "Always":
                self.phase = "Succeeded"
                return
            if policy == "Never":
                self.phase = "Failed"
                return
            self.cluster.container_failed(self, code)
            if self.deleting or not self._backoff():
                return

    def _waiting(self, reason: str) -> None:
        if reason != self.reason:
            self.reason = reason
            self.cluster.event(f"pod/{self.name}", reason)
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"[rendered-driver] {reason}\n")

    def _backoff(self) -> bool:
        self.restarts += 1
        delay = min(_BACKOFF_S * 2 ** (self.restarts - 1), _BACKOFF_MAX_S)
        self.cluster.event(
            f"pod/{self.name}",
            f"back-off {delay:.0f}s restarting (restart {self.restarts})",
        )
        return self._sleep(delay)

    def _run_container(self, spec: dict[str, Any], *, probes: bool) -> int | None:
        """Start the container, supervise it until it exits; its exit code, or
        None when the pod was deleted meanwhile."""
        while True:
            try:
                plan = self.cluster.plan(self, spec)
                break
            except _Missing as exc:
                self._waiting(f"CreateContainerConfigError: {exc}")
                if not self._sleep(2.0):
                    return None
        if probes:
            self.plan = plan
        self.phase = "Running"
        self.reason = ""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                plan.argv,
                env=plan.env,
                cwd=plan.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: SIGKILL reaches every child
            )
        self.cluster.event(
            f"pod/{self.name}", f"started {spec['name']} (pid {proc.pid}): {plan.argv}"
        )
        code = self._supervise(proc, plan, spec if probes else {})
        self.exit_codes.append(code if code is not None else -9)
        return None if self.deleting else code

    def _supervise(
        self, proc: subprocess.Popen[bytes], plan: _Plan, spec: dict[str, Any]
    ) -> int | None:
        startup = spec.get("startupProbe")
        probes = {
            kind: spec[key]
            for kind, key in (
                ("startup", "startupProbe"),
                ("liveness", "livenessProbe"),
                ("readiness", "readinessProbe"),
            )
            if spec.get(key)
        }
        t0 = time.monotonic()
        due = {
            k: t0 + float(p.get("initialDelaySeconds", 0)) for k, p in probes.items()
        }
        fails = dict.fromkeys(probes, 0)
        oks = dict.fromkeys(probes, 0)
        started = startup is None
        while True:
            if self.deleting:
                self.ready = False
                self._kill(proc, self.termination_grace())
                return None
            code = proc.poll()
            if code is not None:
                self.ready = False
                self.cluster.event(f"pod/{self.name}", f"{plan.name} exited {code}")
                return code
            now = time.monotonic()
            for kind, probe in probes.items():
                if now < due[kind] or (kind != "startup" and not started):
                    continue
                if kind == "startup" and started:
                    continue
                ok = self._probe(probe, plan)
                due[kind] = time.monotonic() + float(probe.get("periodSeconds", 10))
                if ok:
                    oks[kind] += 1
                    fails[kind] = 0
                else:
                    fails[kind] += 1
                    oks[kind] = 0
                threshold = int(probe.get("failureThreshold", 3))
                if kind == "startup":
                    if ok:
                        started = True
                        # liveness and readiness start counting now
                        for k in due:
                            if k != "startup":
                                due[k] = max(due[k], time.monotonic())
                    elif fails[kind] >= threshold:
                        return self._probe_kill(proc, "startup", fails[kind])
                elif kind == "liveness" and fails[kind] >= threshold:
                    return self._probe_kill(proc, "liveness", fails[kind])
                elif kind == "readiness":
                    need = int(probe.get("successThreshold", 1))
                    if ok and oks[kind] >= need and not self.ready:
                        self.ready = True
                        self.cluster.event(f"pod/{self.name}", "Ready")
                    elif not ok and fails[kind] >= threshold and self.ready:
                        self.ready = False
                        self.cluster.event(f"pod/{self.name}", "not Ready")
            if started and "readiness" not in probes and not self.ready:
                self.ready = True
                self.cluster.event(f"pod/{self.name}", "Ready (no readiness probe)")
            nxt = min(
                [d for k, d in due.items() if not (k == "startup" and started)],
                default=now + _TICK_S,
            )
            self.wake.wait(min(max(nxt - time.monotonic(), 0.0), _TICK_S))

    def _probe_kill(self, proc: subprocess.Popen[bytes], kind: str, fails: int) -> int:
        self.ready = False
        self._waiting(f"{kind} probe failed {fails} times: killing the container")
        self._kill(proc, self.termination_grace())
        code = proc.returncode if proc.returncode is not None else -9
        self.cluster.event(f"pod/{self.name}", f"killed ({kind} probe), exit {code}")
        return code if code != 0 else 137

    def _kill(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        """SIGTERM to the container's main process, SIGKILL to its process group
        after ``grace`` seconds (what is left of it, children included)."""
        if proc.poll() is None and grace > 0:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _probe(self, probe: dict[str, Any], plan: _Plan) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            h = probe["httpGet"]
            port = self._probe_port(h.get("port"), plan)
            if port is None:
                return False
            scheme = str(h.get("scheme", "HTTP")).lower()
            headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
            try:
                resp = httpx.get(
                    f"{scheme}://127.0.0.1:{port}{h.get('path', '/')}",
                    headers=headers,
                    timeout=timeout,
                    trust_env=False,
                    verify=False,
                )
            except httpx.HTTPError:
                return False
            return 200 <= resp.status_code < 400
        if "tcpSocket" in probe:
            port = self._probe_port(probe["tcpSocket"].get("port"), plan)
            if port is None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                    return True
            except OSError:
                return False
        if "exec" in probe:
            argv = [
                rewrite_port_flags(rewrite_paths(a, plan.mounts), plan.ports)
                for a in probe["exec"]["command"]
            ]
            argv[0] = self.cluster.executable(argv[0])
            try:
                done = subprocess.run(
                    argv,
                    env=plan.env,
                    cwd=plan.cwd,
                    capture_output=True,
                    timeout=max(timeout, 1.0),
                )
            except subprocess.TimeoutExpired:
                return False
            return done.returncode == 0
        raise Unsupported(f"pod {self.name}: probe {sorted(probe)}")

    def _probe_port(self, port: Any, plan: _Plan) -> int | None:
        if isinstance(port, str) and not port.isdigit():
            if port not in plan.named:
                return None
            port = plan.named[port]
        return plan.ports.get(int(port))


# -- the cluster -------------------------------------------------------------------


@dataclass
class _Job:
    obj: dict[str, Any]
    hook: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    succeeded: set[int] = field(default_factory=set)
    failures: int = 0
    state: str = "Running"  # Running, Complete, Failed
    not_before: float = 0.0

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


class _Cluster:
    """The API objects, the controllers and the pods."""

    def __init__(self, workdir: Path, namespace: str) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.lock = threading.RLock()
        self.port_pool = _Ports()
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.configmaps: dict[str, dict[str, bytes]] = {}
        self.services: dict[str, _Service] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.statefulsets: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, _Job] = {}
        self.pods: dict[str, _Pod] = {}
        # Pods' volumes live under a short path: a Unix socket a process makes in
        # its /tmp (multiprocessing does) must fit in 108 bytes, as in a pod.
        self.scratch = Path(tempfile.mkdtemp(prefix="pgr-", dir=_short_tmp()))
        self.pod_dirs = 0
        self.dns = workdir / "cluster" / "dns"
        self.dns.mkdir(parents=True, exist_ok=True)
        (self.dns / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self._write_dns()
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.events = workdir / "events.log"
        self.proxies = _Proxies(self.endpoints)
        self.stopping = False
        #: what went wrong in a controller or a kubelet thread (they then stop)
        self.errors: list[str] = []
        self.controller = threading.Thread(
            target=self._reconcile_loop, name="rendered-controllers", daemon=True
        )
        self.controller.start()

    def pod_dir(self, pod: str) -> Path:
        with self.lock:
            self.pod_dirs += 1
            path = self.scratch / str(self.pod_dirs)
        self.event(f"pod/{pod}", f"volumes in {path}")
        return path

    def event(self, what: str, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {what}: {message}\n")

    # -- Services and DNS

    def _write_dns(self) -> None:
        names: dict[str, str] = {}
        for svc in self.services.values():
            n, ns = svc.name, self.namespace
            for alias in (
                n,
                f"{n}.{ns}",
                f"{n}.{ns}.svc",
                f"{n}.{ns}.svc.cluster.local",
            ):
                names[alias] = svc.address
        table = {"namespace": self.namespace, "names": names}
        tmp = self.dns / "dns.json.tmp"
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, self.dns / "dns.json")

    def apply_service(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        old = self.services.get(name)
        if old is not None and old.obj["spec"].get("ports") == obj["spec"].get("ports"):
            old.obj = obj  # selector and the rest take effect at once
            return
        if old is not None:
            self.delete_service(name)
        ports = []
        for p in obj["spec"].get("ports") or []:
            if p.get("protocol", "TCP") != "TCP":
                raise Unsupported(f"Service {name}: protocol {p['protocol']}")
            ports.append(
                _ServicePort(
                    name=p.get("name"),
                    port=int(p["port"]),
                    target=p.get("targetPort", p["port"]),
                )
            )
        svc = _Service(obj, ports, self.port_pool.address([sp.port for sp in ports]))
        self.services[name] = svc
        for sp in ports:
            self.proxies.open(name, svc.address, sp)
        self._write_dns()
        self.event(
            f"service/{name}",
            f"at {svc.address}:" + ",".join(str(sp.port) for sp in ports),
        )

    def delete_service(self, name: str) -> None:
        svc = self.services.pop(name, None)
        if svc is None:
            return
        for sp in svc.ports:
            self.proxies.close(sp)
        self._write_dns()
        self.event(f"service/{name}", "deleted")

    def endpoints(self, service: str, sp: _ServicePort) -> list[int]:
        """Loopback ports of the Ready pods behind ``service``'s port ``sp``."""
        with self.lock:
            svc = self.services.get(service)
            if svc is None:
                return []
            selector = svc.obj["spec"].get("selector")
            out = []
            for pod in self.pods.values():
                if not pod.ready or pod.deleting or pod.plan is None:
                    continue
                if not selector_matches(selector, pod.labels):
                    continue
                target = sp.target
                if isinstance(target, str) and not target.isdigit():
                    if target not in pod.plan.named:
                        continue
                    target = pod.plan.named[target]
                local = pod.plan.ports.get(int(target))
                if local is not None:
                    out.append(local)
            return sorted(out)

    def service_url(self, component: str) -> str:
        """``http://127.0.0.1:<port>`` of the Service labelled with ``component``."""
        for svc in self.services.values():
            labels = svc.obj["metadata"].get("labels") or {}
            if labels.get("app.kubernetes.io/component") == component:
                sp = next((p for p in svc.ports if p.name == "http"), svc.ports[0])
                return f"http://{svc.address}:{sp.port}"
        raise LookupError(f"no Service with component {component}")

    # -- what a container gets

    def executable(self, command: str) -> str:
        if command in ("python", "python3") or command.startswith(
            "/opt/venv/bin/python"
        ):
            return sys.executable
        found = shutil.which(command)
        if found is None:
            raise Unsupported(f"the container runs {command!r}, not installed here")
        return found

    def _lookup(self, store: str, name: str, key: str | None, optional: bool) -> Any:
        objects = self.secrets if store == "Secret" else self.configmaps
        data = objects.get(name)
        if data is None:
            if optional:
                return None
            raise _Missing(f'{store.lower()} "{name}" not found')
        if key is None:
            return data
        if key not in data:
            if optional:
                return None
            raise _Missing(
                f"couldn't find key {key} in {store} {self.namespace}/{name}"
            )
        return data[key].decode()

    def _field(self, pod: _Pod, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            source = pod.labels if m.group(1) == "labels" else pod.annotations
            return str(source.get(m.group(2), ""))
        values = {
            "metadata.name": pod.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": pod.uid,
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": "rendered-local",
            "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
        }
        if path not in values:
            raise Unsupported(f"pod {pod.name}: fieldRef {path}")
        return str(values[path])

    def _service_links(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for svc in self.services.values():
            if svc.headless or not svc.ports:
                continue
            n = _env_name(svc.name)
            first = svc.ports[0]
            ip = svc.address
            env[f"{n}_SERVICE_HOST"] = ip
            env[f"{n}_SERVICE_PORT"] = str(first.port)
            env[f"{n}_PORT"] = f"tcp://{ip}:{first.port}"
            for sp in svc.ports:
                if sp.name:
                    env[f"{n}_SERVICE_PORT_{_env_name(sp.name)}"] = str(sp.port)
                base = f"{n}_PORT_{sp.port}_TCP"
                env[base] = f"tcp://{ip}:{sp.port}"
                env[f"{base}_PROTO"] = "tcp"
                env[f"{base}_PORT"] = str(sp.port)
                env[f"{base}_ADDR"] = ip
        return env

    def plan(self, pod: _Pod, c: dict[str, Any]) -> _Plan:
        """``c`` of ``pod`` as a local process: its argv, environment, ports."""
        with self.lock:
            return self._plan(pod, c)

    def _plan(self, pod: _Pod, c: dict[str, Any]) -> _Plan:
        entrypoint = not c.get("command")
        image = str(c.get("image", ""))
        if entrypoint and not image.rsplit(":", 1)[0].endswith("protogalaxy"):
            raise Unsupported(
                f"pod {pod.name}: container {c['name']} runs the ENTRYPOINT of "
                f"{image}; the driver knows only the protogalaxy image's"
            )
        env: dict[str, str] = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/nonexistent"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        if entrypoint:
            env.update(_IMAGE_ENV)
        if pod.spec.get("enableServiceLinks", True):
            env.update(self._service_links())
        declared: set[str] = set()  # what the container sets: paths are rewritten
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    ref = source[key]
                    data = self._lookup(
                        kind, ref["name"], None, ref.get("optional", False)
                    )
                    for k, v in (data or {}).items():
                        env[prefix + k] = v.decode()
                        declared.add(prefix + k)
        for e in c.get("env") or []:
            name = e["name"]
            declared.add(name)
            if "value" in e or "valueFrom" not in e:
                env[name] = expand(str(e.get("value", "")), env)
                continue
            src = e["valueFrom"]
            if "secretKeyRef" in src or "configMapKeyRef" in src:
                kind = "Secret" if "secretKeyRef" in src else "ConfigMap"
                ref = src["secretKeyRef" if kind == "Secret" else "configMapKeyRef"]
                value = self._lookup(
                    kind, ref["name"], ref["key"], ref.get("optional", False)
                )
                if value is not None:
                    env[name] = value
            elif "fieldRef" in src:
                env[name] = self._field(pod, src["fieldRef"]["fieldPath"])
            else:
                raise Unsupported(f"pod {pod.name}: env {name} from {sorted(src)}")
        # What Kubernetes (JOB_COMPLETION_INDEX) or the driver (PG_KEYGEN_DIR) sets.
        env.update(pod.extra_env)
        argv = [
            expand(str(a), env)
            for a in (c.get("command") or []) + (c.get("args") or [])
        ]
        mounts: list[tuple[str, Path]] = []
        for m in c.get("volumeMounts") or []:
            if m["name"] not in pod.volumes:
                raise Unsupported(
                    f"pod {pod.name}: mount of unknown volume {m['name']}"
                )
            local = pod.volumes[m["name"]]
            if m.get("subPath"):
                local = local / m["subPath"]
            mounts.append((m["mountPath"], local))
            if m["mountPath"].rstrip("/") == "/tmp":
                env["TMPDIR"] = str(local)
        for k in declared & set(env):
            env[k] = rewrite_paths(env[k], mounts)
        argv = [rewrite_paths(a, mounts) for a in argv]
        named = {
            p["name"]: int(p["containerPort"])
            for p in c.get("ports") or []
            if p.get("name")
        }
        container_ports = [int(p["containerPort"]) for p in c.get("ports") or []]
        ports: dict[int, int] = {}
        if entrypoint:
            argv = [sys.executable, "-m", "protogalaxy.services", *argv]
            raw = env.get("PG_PORT", "")
            if container_ports and raw.isdigit():
                ports[int(raw)] = pod.local_port(int(raw))
                env["PG_PORT"] = str(ports[int(raw)])
                env["PG_HOST"] = "127.0.0.1"
        else:
            argv[0] = self.executable(argv[0])
            if Path(argv[0]).name == "redis-server":
                port = 6379
                for i, a in enumerate(argv[:-1]):
                    if a == "--port":
                        port = int(argv[i + 1])
                        argv[i + 1] = str(pod.local_port(port))
                if port not in pod.ports:
                    argv += ["--port", str(pod.local_port(port))]
                ports[port] = pod.ports[port]
                argv += ["--bind", "127.0.0.1"]
            elif container_ports:
                raise Unsupported(
                    f"pod {pod.name}: {argv[0]} declares ports; the driver moves the "
                    "listening port of `python -m protogalaxy.services` and "
                    "redis-server only"
                )
        python = Path(argv[0]).name.startswith("python") or argv[0] == sys.executable
        if python:
            env["PYTHONPATH"] = os.pathsep.join(
                x for x in (str(self.dns), env.get("PYTHONPATH", "")) if x
            )
        else:
            for a in argv[1:]:
                for svc in self.services:
                    if re.search(rf"(?<![\w-]){re.escape(svc)}(?![\w-])", a):
                        raise Unsupported(
                            f"pod {pod.name}: {argv[0]} is given the Service name "
                            f"{svc}; the driver resolves Service names for Python "
                            "processes only"
                        )
        cwd = str(ROOT)
        if c.get("workingDir"):
            wd = rewrite_paths(c["workingDir"], mounts)
            if wd != c["workingDir"]:
                cwd = wd
        return _Plan(c["name"], argv, env, cwd, ports, named, mounts, c)

    def make_volumes(self, pod: _Pod) -> dict[str, Path]:
        with self.lock:
            out: dict[str, Path] = {}
            for vol in pod.spec.get("volumes") or []:
                out[vol["name"]] = self._volume(pod, vol)
            for name, path in pod.claims.items():
                path.mkdir(parents=True, exist_ok=True)
                out[name] = path
            return out

    def _volume(self, pod: _Pod, vol: dict[str, Any]) -> Path:
        name = vol["name"]
        local: Path = pod.dir / "volumes" / str(name)
        if "emptyDir" in vol:
            local.mkdir(parents=True, exist_ok=True)
            return local
        if "persistentVolumeClaim" in vol:
            claim = str(vol["persistentVolumeClaim"]["claimName"])
            path: Path = self.workdir / "cluster" / "pvc" / claim
            path.mkdir(parents=True, exist_ok=True)
            return path
        if "configMap" in vol or "secret" in vol:
            self._fill(pod, vol, local)
            return local
        raise Unsupported(f"pod {pod.name}: volume {name} of {sorted(vol)}")

    def _fill(self, pod: _Pod, vol: dict[str, Any], local: Path) -> None:
        """Write a configMap or secret volume's files (again) into ``local``."""
        if "configMap" in vol:
            src, kind, ref = vol["configMap"], "ConfigMap", vol["configMap"]["name"]
        else:
            src, kind, ref = vol["secret"], "Secret", vol["secret"]["secretName"]
        data = self._lookup(kind, ref, None, src.get("optional", False)) or {}
        default_mode = int(src.get("defaultMode", 0o644))
        items = src.get("items")
        files: dict[str, tuple[bytes, int]] = {}
        if items:
            for it in items:
                if it["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise _Missing(f"{kind} {ref} has no key {it['key']}")
                files[it["path"]] = (data[it["key"]], int(it.get("mode", default_mode)))
        else:
            files = {k: (v, default_mode) for k, v in data.items()}
        local.mkdir(parents=True, exist_ok=True)
        for old in local.rglob("*"):
            if old.is_file() and old.relative_to(local).as_posix() not in files:
                old.unlink()
        for rel, (value, mode) in files.items():
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                os.chmod(target, 0o600)
            target.write_bytes(value)
            os.chmod(target, mode)

    def refresh_volumes(self, changed: set[tuple[str, str]]) -> None:
        """Rewrite configMap/secret volumes of running pods whose object changed
        (the kubelet syncs them; env is read at container start only)."""
        for pod in list(self.pods.values()):
            if not pod.live or not pod.volumes:
                continue
            for vol in pod.spec.get("volumes") or []:
                key = (
                    ("ConfigMap", vol["configMap"]["name"]) if "configMap" in vol
                    else ("Secret", vol["secret"]["secretName"]) if "secret" in vol
                    else None
                )  # fmt: skip
                if key in changed:
                    with contextlib.suppress(_Missing):
                        self._fill(pod, vol, pod.volumes[vol["name"]])

    # -- pods and controllers

    def add_pod(self, pod: _Pod) -> _Pod:
        with self.lock:
            if pod.name in self.pods and not self.pods[pod.name].done.is_set():
                raise RuntimeError(f"pod {pod.name} exists")
            self.pods[pod.name] = pod
        pod.start()
        return pod

    def pod_finished(self, pod: _Pod) -> None:
        with self.lock:
            job = self.jobs.get(pod.owner[1]) if pod.owner[0] == "Job" else None
            if job is not None and pod.index is not None and job.state == "Running":
                if pod.phase == "Succeeded":
                    job.succeeded.add(pod.index)
                else:  # failed, or deleted before it succeeded
                    job.failures += 1
                    job.not_before = time.monotonic() + min(
                        _BACKOFF_S * 2 ** (job.failures - 1), 360.0
                    )
                    self._check_backoff(job)
            if self.pods.get(pod.name) is pod and pod.deleting:
                del self.pods[pod.name]

    def container_failed(self, pod: _Pod, code: int) -> None:
        with self.lock:
            job = self.jobs.get(pod.owner[1]) if pod.owner[0] == "Job" else None
            if job is not None and job.state == "Running":
                job.failures += 1  # OnFailure: each restart is a retry
                self._check_backoff(job)

    def _check_backoff(self, job: _Job) -> None:
        limit = int(job.obj["spec"].get("backoffLimit", 6))
        if job.failures > limit:
            job.state = "Failed"
            self.event(f"job/{job.name}", f"BackoffLimitExceeded ({job.failures})")
            for pod in self.owned("Job", job.name):
                pod.delete()

    def owned(self, kind: str, name: str) -> list[_Pod]:
        return [p for p in self.pods.values() if p.owner == (kind, name) and p.live]

    def _reconcile_loop(self) -> None:
        while not self.stopping:
            if self.errors:
                time.sleep(_TICK_S)
                continue
            try:
                with self.lock:
                    for name in list(self.deployments):
                        self._deployment(name)
                    for name in list(self.statefulsets):
                        self._statefulset(name)
                    for job in list(self.jobs.values()):
                        self._job(job)
            except Exception as exc:  # stop reconciling; install/upgrade raise it
                self.errors.append(f"controllers: {exc!r}")
                self.event("controllers", f"error: {exc!r}")
            time.sleep(_TICK_S)

    def _deployment(self, name: str) -> None:
        obj = self.deployments[name]
        spec = obj["spec"]
        want = int(spec.get("replicas", 1))
        rev = digest(spec["template"])
        pods = self.owned("Deployment", name)
        new = [p for p in pods if p.revision == rev]
        old = [p for p in pods if p.revision != rev]
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            for p in old:
                p.delete()
            if any(p.owner == ("Deployment", name) and p.revision != rev
                   for p in self.pods.values()):  # fmt: skip
                return  # the old pods are still terminating
            for _ in range(want - len(new)):
                self._new_deployment_pod(name, obj, rev)
            for p in new[want:]:
                p.delete()
            return
        ru = strategy.get("rollingUpdate") or {}
        surge = _scaled(ru.get("maxSurge", "25%"), want, up=True)
        unavailable = _scaled(ru.get("maxUnavailable", "25%"), want, up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        if len(new) > want:
            for p in sorted(new, key=lambda p: p.ready)[: len(new) - want]:
                p.delete()
            return
        room = want + surge - len(pods)
        for _ in range(min(room, want - len(new))):
            self._new_deployment_pod(name, obj, rev)
        ready = sum(p.ready for p in self.owned("Deployment", name))
        # Old pods go while enough stay Ready: the unready ones first.
        for p in sorted(old, key=lambda p: p.ready):
            if not p.ready or ready - 1 >= want - unavailable:
                ready -= p.ready
                p.delete()

    def _new_deployment_pod(self, name: str, obj: dict[str, Any], rev: str) -> None:
        pod = _Pod(
            self,
            name=_kube_name(f"{name}-{rev}"),
            template=obj["spec"]["template"],
            owner=("Deployment", name),
            revision=rev,
            labels={"pod-template-hash": rev},
        )
        self.add_pod(pod)

    def _statefulset(self, name: str) -> None:
        obj = self.statefulsets[name]
        spec = obj["spec"]
        want = int(spec.get("replicas", 1))
        rev = digest(spec["template"])
        ordered = spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
        by_ordinal = {p.index: p for p in self.owned("StatefulSet", name)}
        terminating = {
            p.index
            for p in self.pods.values()
            if p.owner == ("StatefulSet", name) and p.deleting
        }
        for ordinal in range(want):
            pod = by_ordinal.get(ordinal)
            if pod is None:
                if ordinal in terminating:
                    return  # its old self must be gone first (stable identity)
                self._new_statefulset_pod(name, obj, rev, ordinal)
                if ordered:
                    return
                continue
            if ordered and not pod.ready:
                return
        for index, extra in sorted(by_ordinal.items(), key=lambda kv: -(kv[0] or 0)):
            if index is not None and index >= want:
                extra.delete()
                return
        if (spec.get("updateStrategy") or {}).get("type") == "OnDelete":
            return
        stale = [
            p for o, p in sorted(by_ordinal.items(), reverse=True) if p.revision != rev
        ]
        if stale and all(p.ready for p in by_ordinal.values() if p.revision == rev):
            stale[0].delete()  # its replacement comes once it has stopped

    def _new_statefulset_pod(
        self, name: str, obj: dict[str, Any], rev: str, ordinal: int
    ) -> None:
        pod_name = f"{name}-{ordinal}"
        claims = {
            t["metadata"]["name"]: self.workdir
            / "cluster"
            / "pvc"
            / f"{t['metadata']['name']}-{pod_name}"
            for t in obj["spec"].get("volumeClaimTemplates") or []
        }
        pod = _Pod(
            self,
            name=pod_name,
            template=obj["spec"]["template"],
            owner=("StatefulSet", name),
            revision=rev,
            index=ordinal,
            claims=claims,
            labels={
                "controller-revision-hash": f"{name}-{rev}",
                "statefulset.kubernetes.io/pod-name": pod_name,
                "apps.kubernetes.io/pod-index": str(ordinal),
            },
        )
        self.add_pod(pod)

    def _job(self, job: _Job) -> None:
        if job.state != "Running":
            return
        spec = job.obj["spec"]
        completions = int(spec.get("completions", 1))
        parallelism = int(spec.get("parallelism", 1))
        indexed = spec.get("completionMode", "NonIndexed") == "Indexed"
        if len(job.succeeded) >= completions:
            job.state = "Complete"
            self.event(f"job/{job.name}", "Complete")
            return
        active = self.owned("Job", job.name)
        busy = {p.index for p in active}
        if time.monotonic() < job.not_before:
            return
        pending = [i for i in range(completions) if i not in job.succeeded | busy]
        for index in pending[: max(0, parallelism - len(active))]:
            labels = {
                "batch.kubernetes.io/job-name": job.name,
                "job-name": job.name,
                "batch.kubernetes.io/controller-uid": digest(job.name, 36),
            }
            annotations = {}
            extra = dict(job.extra_env)
            if indexed:
                labels["batch.kubernetes.io/job-completion-index"] = str(index)
                annotations["batch.kubernetes.io/job-completion-index"] = str(index)
                extra["JOB_COMPLETION_INDEX"] = str(index)
            pod = _Pod(
                self,
                name=_kube_name(f"{job.name}-{index}" if indexed else job.name),
                template=spec["template"],
                owner=("Job", job.name),
                revision=digest(spec["template"]),
                index=index,
                labels=labels,
                annotations=annotations,
                extra_env=extra,
            )
            self.add_pod(pod)

    def stop(self, grace: float = 5.0) -> None:
        """Stop every pod (SIGTERM, SIGKILL after ``grace`` s) and every proxy."""
        self.stopping = True
        self.controller.join(timeout=10)
        with self.lock:
            pods = list(self.pods.values())
        for p in pods:
            p.grace = min(p.termination_grace(), grace)
            p.deleting = True
            p.ready = False
            p.wake.set()
        for p in pods:
            p.done.wait(timeout=grace + 30)
        for svc in list(self.services.values()):
            for sp in svc.ports:
                with contextlib.suppress(Exception):
                    self.proxies.close(sp)
        self.proxies.stop()
        # Deleted pods lose their volumes (PVC directories stay in the workdir).
        shutil.rmtree(self.scratch, ignore_errors=True)


def _short_tmp() -> str | None:
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None


def _scaled(value: Any, total: int, *, up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        x = total * int(value[:-1]) / 100
        return math.ceil(x) if up else math.floor(x)
    return int(value)


# -- the driver --------------------------------------------------------------------


class RenderedDriver(Driver):
    """The chart's rendered objects as local processes (see the module docstring)."""

    name = "rendered"

    def __init__(self, workdir: Path, *, helm: str, release: str = "pg") -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (./dev test installs it)")
        self.workdir = Path(workdir)
        self.helm = helm
        self.release = release
        self.namespace = f"pg-{uuid.uuid4().hex[:8]}"
        self.cluster = _Cluster(self.workdir, self.namespace)
        #: the last applied render: (kind, name) -> object
        self.applied: dict[tuple[str, str], dict[str, Any]] = {}
        self.tests: list[dict[str, Any]] = []
        #: (kind, name, why) of every object recorded and not acted on
        self.skipped: list[tuple[str, str, str]] = []
        #: Secrets the key hook made (they outlive releases, as in a cluster)
        self.made_secrets: set[str] = set()
        self.overrides: dict[str, Any] = {}
        self.revision = 0

    # -- rendering

    def _sets(self, overrides: dict[str, Any]) -> list[str]:
        out = []
        for key, value in {**BASE, **overrides}.items():
            if key not in _VALUES:
                raise KeyError(
                    f"no chart value for the config key {key!r} "
                    f"(known: {', '.join(sorted(_VALUES))})"
                )
            out += ["--set-json", f"{_VALUES[key]}={json.dumps(value)}"]
        return out

    def _render(self, sets: list[str], *, upgrade: bool) -> list[dict[str, Any]]:
        return render(
            self.helm,
            release=self.release,
            namespace=self.namespace,
            sets=sets,
            upgrade=upgrade,
        )

    def _run_family(self) -> str | None:
        for (kind, name), obj in self.applied.items():
            data = obj.get("data") or {}
            if kind == "ConfigMap" and name.endswith("-run") and data.get("family"):
                return str(data["family"])
        return None

    def _render_upgrade(self, overrides: dict[str, Any]) -> list[dict[str, Any]]:
        """Render for an upgrade, with what ``lookup`` would have found: the run's
        family, and generated Secret values of the previous apply."""
        sets = self._sets(overrides)
        family = self._run_family()
        if family is not None and not any(s.startswith("run.id=") for s in sets):
            sets += ["--set-string", f"run.id={family}"]
        first = self._render(sets, upgrade=True)
        second = self._render(sets, upgrade=True)
        return self._keep_generated(first, second)

    def _keep_generated(
        self, docs: list[dict[str, Any]], again: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """``lookup`` for a re-render: a Secret value that differs between two
        renders of the same values (``docs`` and ``again``) was generated, and the
        previous apply's value replaces it wherever it appears (an ACL that holds
        it too; a value holding another generated one is fixed through it). Other
        fields that differ between the renders (checksums of such Secrets) keep
        their previous values unless one of those Secrets really changed."""

        def key(d: dict[str, Any]) -> tuple[str, str]:
            return d["kind"], d["metadata"]["name"]

        twin = {key(d): d for d in again}
        pairs: dict[bytes, bytes] = {}
        generated: set[tuple[str, str]] = set()
        unstable: list[tuple[dict[str, Any], tuple[Any, ...]]] = []
        for d in docs:
            other = twin.get(key(d))
            if other is None:
                continue
            prev = self.applied.get(key(d))
            for path in differing_paths(d, other):
                if d["kind"] == "Secret" and path[:1] in (("data",), ("stringData",)):
                    generated.add(key(d))
                    if prev is None or len(path) != 2:
                        continue
                    new = secret_data(d).get(path[1])
                    old = secret_data(prev).get(path[1])
                    if new is not None and old is not None and new != old:
                        pairs[new] = old
                elif path:
                    unstable.append((d, path))

        # Atoms only: a value that holds another generated value (as it is, or
        # as its SHA-256, the form a Redis ACL keeps) is composite, and is fixed
        # through the atoms it holds.
        def forms(new: bytes, old: bytes) -> dict[bytes, bytes]:
            sha = hashlib.sha256
            return {
                new: old,
                sha(new).hexdigest().encode(): sha(old).hexdigest().encode(),
            }

        atoms = {
            new: old
            for new, old in pairs.items()
            if not any(o != new and f in new for o in pairs for f in forms(o, pairs[o]))
        }
        swap: dict[bytes, bytes] = {}
        for new, old in atoms.items():
            swap.update(forms(new, old))
        for d in docs:
            if d["kind"] != "Secret" or not swap:
                continue
            data = secret_data(d)
            for k, v in data.items():
                for new, old in swap.items():
                    v = v.replace(new, old)
                data[k] = v
            d.pop("stringData", None)
            d["data"] = {k: base64.b64encode(v).decode() for k, v in data.items()}
        changed = any(
            key(d) not in self.applied
            or secret_data(self.applied[key(d)]) != secret_data(d)
            for d in docs
            if key(d) in generated
        )
        if not changed:
            for d, path in unstable:
                prev = self.applied.get(key(d))
                value = _get(prev, path) if prev is not None else None
                if value is not None and _get(d, path) is not None:
                    _set(d, path, value)
        return docs

    # -- applying

    def _classify(
        self, docs: list[dict[str, Any]]
    ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        hooks: dict[str, list[dict[str, Any]]] = {}
        objects = []
        self.skipped = []
        for d in docs:
            kind, name = d["kind"], d["metadata"]["name"]
            annotations = d["metadata"].get("annotations") or {}
            phases = [
                p.strip() for p in str(annotations.get("helm.sh/hook", "")).split(",")
                if p.strip()
            ]  # fmt: skip
            if kind in SKIPPED:
                self.skipped.append((kind, name, SKIPPED[kind]))
                continue
            if phases:
                for p in phases:
                    if p in _HOOKS_NEVER:
                        self.skipped.append((kind, name, f"{p} hook: never run here"))
                    elif p in _HOOKS_RUN:
                        hooks.setdefault(p, []).append(d)
                    else:
                        raise Unsupported(f"{kind} {name}: hook {p!r}")
                continue
            if kind not in (
                "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "Job",
                "PersistentVolumeClaim",
            ):  # fmt: skip
                raise Unsupported(f"{kind} {name}: the driver does not know this kind")
            objects.append(d)
        for d in objects + [h for hs in hooks.values() for h in hs]:
            self._validate(d)

        def order(d: dict[str, Any]) -> tuple[int, int, str]:
            weight = int((d["metadata"].get("annotations") or {}).get(
                "helm.sh/hook-weight", 0
            ))  # fmt: skip
            kind = d["kind"]
            rank = _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)
            return weight, rank, d["metadata"]["name"]

        for phase in hooks:
            hooks[phase].sort(key=order)
        return hooks, objects

    def _validate(self, d: dict[str, Any]) -> None:
        """Refuse, before anything runs, what the driver would not emulate."""
        kind, name = d["kind"], d["metadata"]["name"]
        spec = d.get("spec") or {}
        known = {
            "Deployment": {
                "replicas", "selector", "template", "strategy",
                "revisionHistoryLimit", "progressDeadlineSeconds",
            },
            "StatefulSet": {
                "replicas", "selector", "template", "serviceName",
                "volumeClaimTemplates", "podManagementPolicy", "updateStrategy",
                "revisionHistoryLimit",
                # PVC directories are never removed here: Retain, whatever it says
                "persistentVolumeClaimRetentionPolicy",
            },
            "Job": {
                "completions", "parallelism", "completionMode", "backoffLimit",
                "ttlSecondsAfterFinished", "template",
            },
        }.get(kind)  # fmt: skip
        if known is not None:
            extra = set(spec) - known
            if extra:
                raise Unsupported(f"{kind} {name}: spec fields {sorted(extra)}")
            template = spec["template"]
            selector = spec.get("selector")
            labels = (template.get("metadata") or {}).get("labels") or {}
            if selector is not None and not selector_matches(selector, labels):
                raise RuntimeError(
                    f'{kind}.apps "{name}" is invalid: spec.template.metadata.'
                    "labels: Invalid value: `selector` does not match template "
                    "`labels`"
                )
        elif kind == "Pod":
            template = {"metadata": d["metadata"], "spec": spec}
        else:
            return
        pod = template.get("spec") or {}
        containers = pod.get("containers") or []
        if len(containers) != 1:
            raise Unsupported(f"{kind} {name}: {len(containers)} containers (one only)")
        for c in containers + (pod.get("initContainers") or []):
            if c.get("restartPolicy") == "Always":
                raise Unsupported(f"{kind} {name}: sidecar container {c['name']}")
            if c.get("lifecycle"):
                raise Unsupported(f"{kind} {name}: lifecycle hooks of {c['name']}")
            for e in c.get("env") or []:
                src = set(e.get("valueFrom") or {})
                if src - {"secretKeyRef", "configMapKeyRef", "fieldRef"}:
                    raise Unsupported(
                        f"{kind} {name}: env {e['name']} from {sorted(src)}"
                    )
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                how = set(c.get(probe) or {}) & {"httpGet", "exec", "tcpSocket", "grpc"}
                if "grpc" in how:
                    raise Unsupported(f"{kind} {name}: grpc {probe}")
        for v in pod.get("volumes") or []:
            how = set(v) - {"name"}
            if not how <= {"emptyDir", "configMap", "secret", "persistentVolumeClaim"}:
                raise Unsupported(f"{kind} {name}: volume {v['name']} of {sorted(how)}")
        for flag in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
            if pod.get(flag):
                raise Unsupported(f"{kind} {name}: {flag}")

    def _run_hooks(self, hooks: list[dict[str, Any]], timeout: float = 300) -> None:
        for d in hooks:
            kind, name = d["kind"], d["metadata"]["name"]
            if kind == "ConfigMap":
                self.cluster.configmaps[name] = configmap_data(d)
            elif kind == "Secret":
                self.cluster.secrets[name] = secret_data(d)
            elif kind == "Job":
                self._run_hook_job(d, timeout)
            elif kind == "Pod":
                pod = self._run_pod_to_end(d, timeout)
                if pod.phase != "Succeeded":
                    raise RuntimeError(f"hook pod {name} failed: {self._tail(pod)}")
            else:
                raise Unsupported(f"{kind} {name} as a hook")

    def _run_hook_job(self, d: dict[str, Any], timeout: float) -> None:
        name = d["metadata"]["name"]
        if d["spec"].get("completionMode") == "Indexed":
            raise Unsupported(f"hook Job {name} is Indexed")
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        extra: dict[str, str] = {}
        secret = env.get("PG_KEY_SECRET")
        if secret:
            keydir = self.workdir / "cluster" / "keygen" / secret
            keydir.parent.mkdir(parents=True, exist_ok=True)
            extra["PG_KEYGEN_DIR"] = str(keydir)
        job = _Job(d, hook=True, extra_env=extra)
        with self.cluster.lock:
            self.cluster.jobs[name] = job
        deadline = time.monotonic() + timeout
        while job.state == "Running" and time.monotonic() < deadline:
            time.sleep(_TICK_S)
        with self.cluster.lock:
            del self.cluster.jobs[name]  # hook-delete-policy: hook-succeeded
            pods = [p for p in self.cluster.pods.values() if p.owner == ("Job", name)]
        for p in pods:
            p.delete()
        if job.state != "Complete":
            logs = "; ".join(self._tail(p) for p in pods) or "no pod ran"
            raise RuntimeError(f"hook Job {name}: {job.state}: {logs}")
        if secret:
            files = {
                p.name: p.read_bytes()
                for p in sorted(Path(extra["PG_KEYGEN_DIR"]).iterdir())
                if not p.name.startswith(".")
            }
            with self.cluster.lock:
                self.cluster.secrets[secret] = files
                self.cluster.refresh_volumes({("Secret", secret)})
            self.made_secrets.add(secret)
            self.cluster.event(
                f"secret/{secret}", f"made from the key hook's files {sorted(files)}"
            )

    def _run_pod_to_end(self, d: dict[str, Any], timeout: float) -> _Pod:
        name = d["metadata"]["name"]
        with self.cluster.lock:
            old = self.cluster.pods.get(name)
        if old is not None:  # hook-delete-policy: before-hook-creation
            old.delete(0)
            old.done.wait(timeout=60)
        pod = _Pod(
            self.cluster,
            name=name,
            template={"metadata": d["metadata"], "spec": d["spec"]},
            owner=("Pod", name),
            revision=digest(d["spec"]),
        )
        self.cluster.add_pod(pod)
        deadline = time.monotonic() + timeout
        while (
            not pod.finished and not pod.done.is_set() and time.monotonic() < deadline
        ):
            time.sleep(_TICK_S)
        if not pod.finished:
            pod.delete(0)
        pod.done.wait(timeout=60)
        return pod

    def _apply(self, docs: list[dict[str, Any]], *, upgrade: bool) -> None:
        self.revision += 1  # what was applied, for diagnosis
        (self.workdir / f"applied-{self.revision}.yaml").write_text(
            yaml.safe_dump_all(docs, sort_keys=False)
        )
        hooks, objects = self._classify(docs)
        new = {(d["kind"], d["metadata"]["name"]): d for d in objects}
        # The API server refuses a Job update that changes what is immutable.
        for (kind, name), d in new.items():
            prev = self.applied.get((kind, name))
            if kind == "Job" and prev is not None:
                for f in ("template", "completions", "completionMode", "selector"):
                    if prev["spec"].get(f) != d["spec"].get(f):
                        raise RuntimeError(
                            f'cannot patch "{name}" with kind Job: Job.batch '
                            f'"{name}" is invalid: spec.{f}: field is immutable'
                        )
        self._run_hooks(hooks.get("pre-upgrade" if upgrade else "pre-install", []))
        c = self.cluster
        with c.lock:
            changed: set[tuple[str, str]] = set()
            for (kind, name), d in new.items():
                if kind == "Secret":
                    data = secret_data(d)
                    changed |= {(kind, name)} if c.secrets.get(name) != data else set()
                    c.secrets[name] = data
                elif kind == "ConfigMap":
                    data = configmap_data(d)
                    changed |= (
                        {(kind, name)} if c.configmaps.get(name) != data else set()
                    )
                    c.configmaps[name] = data
                elif kind == "PersistentVolumeClaim":
                    (self.workdir / "cluster" / "pvc" / name).mkdir(
                        parents=True, exist_ok=True
                    )
            for (kind, _), d in new.items():
                if kind == "Service":
                    c.apply_service(d)
            c.refresh_volumes(changed)
            for (kind, name), d in new.items():
                if kind == "Deployment":
                    c.deployments[name] = d
                elif kind == "StatefulSet":
                    c.statefulsets[name] = d
                elif kind == "Job" and name not in c.jobs:
                    c.jobs[name] = _Job(d)
            # What the new release no longer has goes (PVC directories stay).
            for kind, name in self.applied.keys() - new.keys():
                self._delete(kind, name)
            self.applied = new
            self.tests = hooks.get("test", [])
        self._wait_rolled_out()
        self._run_hooks(hooks.get("post-upgrade" if upgrade else "post-install", []))

    def _delete(self, kind: str, name: str) -> None:
        c = self.cluster
        c.event(f"{kind.lower()}/{name}", "no longer rendered: deleted")
        if kind == "Secret" and name not in self.made_secrets:
            c.secrets.pop(name, None)
        elif kind == "ConfigMap":
            c.configmaps.pop(name, None)
        elif kind == "Service":
            c.delete_service(name)
        elif kind in ("Deployment", "StatefulSet", "Job"):
            if kind == "Job":
                c.jobs.pop(name, None)
            else:
                (c.deployments if kind == "Deployment" else c.statefulsets).pop(
                    name, None
                )
            for p in c.owned(kind, name):
                p.delete()

    def rolled_out(self) -> list[str]:
        """What ``helm --wait`` still waits for (empty when done). Raises
        ``RuntimeError`` with its log when a pod waited for has crashed
        :data:`CRASHES` times (CrashLoopBackOff: a value every pod refuses fails
        here at once rather than at helm's timeout)."""
        c = self.cluster
        waiting = []
        with c.lock:
            for kind, objs in (
                ("Deployment", c.deployments),
                ("StatefulSet", c.statefulsets),
            ):
                for name, obj in objs.items():
                    want = int(obj["spec"].get("replicas", 1))
                    rev = digest(obj["spec"]["template"])
                    pods = [
                        p
                        for p in c.pods.values()
                        if p.owner == (kind, name) and not p.done.is_set()
                    ]
                    current = [p for p in pods if p.revision == rev and p.live]
                    for p in current:
                        crashes = [x for x in p.exit_codes if x != 0]
                        if len(crashes) >= CRASHES and not p.ready:
                            raise RuntimeError(
                                f"rendered: {kind} {name}: pod {p.name} crashed "
                                f"{len(crashes)} times (CrashLoopBackOff)\n"
                                + self._tail(p, 40)
                            )
                    ready = sum(p.ready for p in current)
                    if ready < want or len(pods) != want:
                        waiting.append(
                            f"{kind} {name}: {ready}/{want} Ready, {len(pods)} pods"
                        )
        return waiting

    def _wait_rolled_out(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while waiting := self.rolled_out():
            if self.cluster.errors:
                raise RuntimeError(f"rendered: {self.cluster.errors}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rendered: not rolled out after {timeout:.0f}s: {waiting}\n"
                    + self.describe()
                )
            time.sleep(0.5)

    # -- diagnosis

    def _tail(self, pod: _Pod, lines: int = 15) -> str:
        try:
            text = pod.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"pod {pod.name} ({pod.phase}, exits {pod.exit_codes}): " + "\n".join(
            text
        )

    def describe(self) -> str:
        """Every pod's state and the end of the log of each that is not Ready."""
        out = [f"error: {e}" for e in self.cluster.errors]
        with self.cluster.lock:
            pods = list(self.cluster.pods.values())
        for p in pods:
            out.append(
                f"pod {p.name}: {p.phase} ready={p.ready} restarts={p.restarts} "
                f"{p.reason}"
            )
            if not p.ready and p.phase != "Succeeded":
                out.append(self._tail(p))
        return "\n".join(out)

    def pods(self, **labels: str) -> list[_Pod]:
        """Live pods whose labels include ``labels`` (``**{"a/b": "c"}``)."""
        with self.cluster.lock:
            return [
                p
                for p in self.cluster.pods.values()
                if p.live and all(p.labels.get(k) == v for k, v in labels.items())
            ]

    # -- the Driver interface

    def install(self, overrides: dict[str, Any]) -> None:
        self.overrides = dict(overrides)
        self._apply(self._render(self._sets(overrides), upgrade=False), upgrade=False)

    def upgrade(self, overrides: dict[str, Any]) -> None:
        self.overrides = dict(overrides)
        self._apply(self._render_upgrade(overrides), upgrade=True)

    def status(self) -> dict[str, Any]:
        url = self.cluster.service_url("global")
        resp = httpx.get(url + "/v1/status", timeout=10, trust_env=False)
        resp.raise_for_status()
        return dict(resp.json())

    def galaxy_log_events(self) -> list[dict[str, Any]]:
        lines: list[str] = []
        for p in self.pods(**{"app.kubernetes.io/component": "galaxy"}):
            if p.log.exists():
                lines += p.log.read_text(errors="replace").splitlines()
        return parse_events(lines)

    def ready_galaxies(self) -> int:
        c = self.cluster
        with c.lock:
            names = [
                n
                for n, d in c.deployments.items()
                if (d["metadata"].get("labels") or {}).get(
                    "app.kubernetes.io/component"
                )
                == "galaxy"
            ]
            return sum(any(p.ready for p in c.owned("Deployment", n)) for n in names)

    def _global_pod(self) -> _Pod:
        pods = self.pods(**{"app.kubernetes.io/component": "global"})
        if len(pods) != 1:
            raise RuntimeError(f"{len(pods)} global pods:\n{self.describe()}")
        return pods[0]

    def restart_global(self) -> None:
        old = self._global_pod()
        old.delete(0)  # SIGKILL: what a crash or a node loss does
        old.done.wait(timeout=60)
        deadline = time.monotonic() + 300
        while True:
            pods = self.pods(**{"app.kubernetes.io/component": "global"})
            if pods and pods[0].uid != old.uid and pods[0].ready:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the global pod did not come back:\n{self.describe()}"
                )
            time.sleep(0.5)

    def restart_client_pod(self, index: int) -> None:
        pods = self.pods(
            **{
                "app.kubernetes.io/component": "clients",
                "batch.kubernetes.io/job-completion-index": str(index),
            }
        )
        if not pods:
            raise LookupError(f"no running client pod of index {index}")
        for p in pods:
            p.delete()  # its grace period, as `kubectl delete pod` does
        for p in pods:
            p.done.wait(timeout=p.termination_grace() + 30)

    def check_install(self) -> bool:
        ok = True  # `helm test` of a chart without tests passes
        for d in self.tests:
            if d["kind"] != "Pod":
                raise Unsupported(f"{d['kind']} {d['metadata']['name']} as a test hook")
            pod = self._run_pod_to_end(d, 300)
            ok = ok and pod.phase == "Succeeded"
        return ok

    def exec_global(self, argv: list[str], timeout: float = 600) -> tuple[int, str]:
        """``kubectl exec`` into the global pod: ``argv`` with its container's
        environment and paths."""
        plan = self._global_pod().plan
        if plan is None:
            raise RuntimeError("the global pod has not started")
        argv = [rewrite_paths(a, plan.mounts) for a in argv]
        argv[0] = self.cluster.executable(argv[0])
        done = subprocess.run(
            argv, env=plan.env, cwd=plan.cwd, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def audit(self) -> tuple[int, str]:
        return self.exec_global(
            ["python", "-c",
             "import os,sys;from protogalaxy.cli import main;"
             "sys.exit(main(['audit',os.environ['PG_AUDIT_DIR']]))"],
        )  # fmt: skip

    def client_ids_seen(self, *, since_round: int = 0) -> set[int]:
        code, out = self.exec_global(
            ["python", "-c", CLIENTS_SEEN_PY, str(since_round)]
        )
        if code != 0:
            raise RuntimeError(f"reading the transcripts failed: {out}")
        return set(json.loads(out.strip().splitlines()[-1]))

    def teardown(self) -> None:
        self.cluster.stop()
        (self.workdir / "describe.txt").write_text(self.describe() + "\n")

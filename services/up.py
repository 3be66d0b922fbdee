"""``protogalaxy up``: the real services as local processes.

Starts ``redis-server`` (append-only file on), the global aggregator, one galaxy
aggregator per galaxy and a client runner, each with exactly the command
(``python -m protogalaxy.services <role>``) and ``PG_*`` environment the containers
use, all on
loopback. Logs go to ``<out>/logs/<name>.log``. :class:`LocalCluster` is also the
harness of the service tests (it can kill and restart any process).

Identities are provisioned first, as the chart's key hook does, into
``<out>/secrets/`` (:func:`~protogalaxy.crypto.keyring.provision`, a 0700
directory): each process gets only its own private key (mode 0600) and the public
keys it checks others against. ``<out>/keys/`` holds only the public keys the run
publishes for auditors, beside the rest of its artefacts.
The client runner gets the clients' seed and no bearer token; the aggregators share
a service token that guards transport only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from protogalaxy.config import SimulationConfig
from protogalaxy.crypto.keyring import provision
from protogalaxy.simulation import choose_byzantine

__all__ = ["LocalCluster"]


def _ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections (Linux; the IANA
    range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(49152, 65536)


def _port_block(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports, below the ephemeral
    range: a port found free there can be taken by any outgoing connection (of
    another test, a client) before the service binds it."""
    ephemeral = _ephemeral_ports()
    top = min(ephemeral.start, 65535) - n
    rng = random.Random()
    for _ in range(200):
        base = (
            rng.randrange(10000, top) if top > 10000 else rng.randrange(1024, 65535 - n)
        )
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {n} free ports")


@dataclass
class _Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the child process
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=handle, stderr=subprocess.STDOUT
        )
        handle.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class LocalCluster:
    config: SimulationConfig
    out: Path
    commit_deadline_s: float = 60.0
    reveal_deadline_s: float = 60.0
    #: the global aggregator's wait for roots and for aggregates and transcripts
    global_deadline_s: float = 120.0
    max_update_bytes: int = 64 << 20
    log_level: str = "warning"
    #: more settings for every service process (``PG_*``), e.g. limits in tests
    extra_env: dict[str, str] = field(default_factory=dict)
    #: the run every signature is bound to (default: a fresh ``up-<hex>``)
    run_id: str = ""
    #: the global aggregator evaluates each round's model (a child process)
    evaluate: bool = True
    procs: dict[str, _Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config.check_services()
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_path = self.out / "config.yaml"
        self.config_path.write_text(
            yaml.safe_dump(self.config.model_dump(), sort_keys=False)
        )
        g = self.config.galaxies.count
        base = _port_block(g + 2)
        self.redis_port, self.global_port = base, base + 1
        self.galaxy_ports = {i: base + 2 + i for i in range(g)}
        self.service_token = secrets.token_hex(16)
        #: auditors' bearer token: the global aggregator fetches updates with it,
        #: and `protogalaxy audit --url` reads the artefacts with it
        self.auditor_token = secrets.token_hex(16)
        # Redis asks for a password, as the chart's does: a neighbour process on
        # this machine cannot write a galaxy's keys or state.
        self.redis_password = secrets.token_hex(16)
        self.redis_url = f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"
        self.global_url = f"http://127.0.0.1:{self.global_port}"
        self.run_id = self.run_id or f"up-{secrets.token_hex(4)}"
        self.keys = self.out / "secrets"
        self.keys.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.keys, 0o700)
        existing = {p.name: p.read_bytes() for p in self.keys.iterdir()}
        files = provision(
            galaxies=g, clients=self.config.clients.count, existing=existing
        )
        for name, data in files.items():
            # Private files are created 0600: never readable by others, not even
            # between the write and a chmod.
            mode = 0o644 if name.endswith(".pub") else 0o600
            fd = os.open(self.keys / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
        #: hex, pinned by the galaxies and the clients
        self.global_public_key = files["global.pub"].decode()

    # -- processes ---------------------------------------------------------------

    def _env(self, **extra: Any) -> dict[str, str]:
        # Nothing PG_* leaks in from the caller's environment: each process gets
        # exactly the settings (and credentials) below.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG_")}
        env.update(
            {
                "PG_CONFIG": str(self.config_path),
                "PG_HOST": "127.0.0.1",
                "PG_LOG_LEVEL": self.log_level,
                "PG_RUN_ID": self.run_id,
                "PG_MAX_UPDATE_BYTES": str(self.max_update_bytes),
                # Every party is on 127.0.0.1 here: the per-peer limit would
                # count them all as one (in a cluster each pod has its address).
                "PG_MAX_CONNECTIONS_PER_PEER": "1024",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _service(self, name: str, role: str, **env: Any) -> _Proc:
        proc = _Proc(
            name,
            [sys.executable, "-m", "protogalaxy.services", role],
            self._env(**env),
            self.out / "logs" / f"{name}.log",
        )
        self.procs[name] = proc
        return proc

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed (apt-get install redis-server)"
            )
        data = self.out / "redis"
        data.mkdir(exist_ok=True)
        secret = data / "auth.conf"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {self.redis_password}\n")
        proc = _Proc(
            "redis",
            [
                exe,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",  # Redis's advice; a clean restart loses nothing
                "--save",
                "",
                "--rdbcompression",
                "no",  # updates are float noise: LZF would burn CPU for nothing
                "--include",  # the password, in a 0600 file rather than argv
                str(secret),
            ],
            dict(os.environ),
            self.out / "logs" / "redis.log",
        )
        self.procs["redis"] = proc
        proc.start()
        self._wait_redis()

    def redis_client(self) -> Any:
        """A client of this cluster's Redis (binary responses)."""
        import redis

        return redis.Redis.from_url(self.redis_url)

    def _wait_redis(self, timeout: float = 15.0) -> None:
        import redis

        client = self.redis_client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def plan(self) -> dict[str, _Proc]:
        """Every service process (global, galaxies, clients) with its command and
        environment, none started: what :meth:`start` runs."""
        data = self.out / "global"
        key = self.global_public_key
        self._service(
            "global",
            "global",
            PG_PORT=self.global_port,
            PG_DATA_DIR=data,
            PG_GALAXIES=self.config.galaxies.count,
            PG_SERVICE_TOKEN=self.service_token,
            PG_SIGNING_KEY_FILE=self.keys / "global.key",
            PG_GALAXY_KEYS_FILE=self.keys / "galaxies.pub",
            PG_CLIENT_KEYS_FILE=self.keys / "clients.pub",
            PG_GALAXY_URLS=",".join(
                self.galaxy_url(g) for g in sorted(self.galaxy_ports)
            ),
            PG_AUDITOR_TOKEN=self.auditor_token,
            PG_LEAF_DEADLINE_S=self.global_deadline_s,
            PG_AGGREGATE_DEADLINE_S=self.global_deadline_s,
            PG_TRANSCRIPT_DEADLINE_S=min(self.global_deadline_s, 10.0),
            # the run directory is what `protogalaxy audit` reads
            PG_AUDIT_DIR=self.out,
            PG_EVALUATE=int(self.evaluate),
            PG_TORCH_THREADS=1,
        )
        for g, port in self.galaxy_ports.items():
            self._service(
                f"galaxy-{g}",
                "galaxy",
                PG_PORT=port,
                PG_GALAXY_ID=g,
                PG_REDIS_URL=self.redis_url,
                PG_GLOBAL_URL=self.global_url,
                PG_SERVICE_TOKEN=self.service_token,
                PG_SIGNING_KEY_FILE=self.keys / f"galaxy-{g}.key",
                PG_GLOBAL_PUBLIC_KEY=key,
                PG_CLIENT_KEYS_FILE=self.keys / "clients.pub",
                # It checks the auditors' token without holding it (with it, a
                # galaxy could read every galaxy's published updates).
                PG_AUDITOR_TOKEN_SHA256=hashlib.sha256(
                    self.auditor_token.encode()
                ).hexdigest(),
                PG_COMMIT_DEADLINE_S=self.commit_deadline_s,
                PG_REVEAL_DEADLINE_S=self.reveal_deadline_s,
                # The aggregators share this machine's cores with the clients:
                # one torch thread each keeps their kernels off the clients' cores.
                PG_TORCH_THREADS=1,
            )
        self._plan_clients()
        return self.procs

    def _plan_clients(self, pinned_key: str | None = None) -> _Proc:
        """The client runner for every client, pinning the global aggregator's key
        (or ``pinned_key``: clients then refuse every receipt, and exit 3). It holds
        the clients' seed and no bearer token."""
        return self._service(
            "clients",
            "client",
            PG_CLIENT_IDS=f"0-{self.config.clients.count - 1}",
            PG_GALAXY_URLS=",".join(
                self.galaxy_url(g) for g in sorted(self.galaxy_ports)
            ),
            PG_CLIENT_SEED_FILE=self.keys / "clients.seed",
            PG_GLOBAL_PUBLIC_KEY=pinned_key or self.global_public_key,
            PG_GLOBAL_URL=self.global_url,
            PG_GALAXY_KEYS_FILE=self.keys / "galaxies.pub",
            PG_RECEIPTS_FILE=self.out / "receipts.jsonl",
        )

    def start(self, *, clients: bool = True, galaxies: bool = True) -> None:
        """Redis, then the global aggregator, the galaxies and the clients together
        (``clients=False``: the caller plays the clients, as the tests do;
        ``galaxies=False``: the caller plays the galaxies too, with their keys).

        Every key was provisioned in ``secrets/`` beforehand, so each party pins the
        others' public keys from its configuration; galaxies and clients retry
        until their peers answer.
        """
        self.start_redis()
        (self.out / "global").mkdir(parents=True, exist_ok=True)
        procs = self.plan()
        procs["global"].start()
        for g in self.galaxy_ports if galaxies else ():
            procs[f"galaxy-{g}"].start()
        if clients:
            procs["clients"].start()
        served = self.wait_ready(self.global_url, "/v1/identity").json()["public_key"]
        if served != self.global_public_key:
            raise RuntimeError(
                "the global aggregator serves another key than the provisioned one"
            )
        for g in self.galaxy_ports if galaxies else ():
            self.wait_ready(self.galaxy_url(g), "/readyz")

    def start_clients(self, *, pinned_key: str | None = None) -> None:
        """Start the client runner (see :meth:`_plan_clients`)."""
        self._plan_clients(pinned_key).start()

    def galaxy_url(self, g: int) -> str:
        return f"http://127.0.0.1:{self.galaxy_ports[g]}"

    def wait_ready(self, url: str, path: str, timeout: float = 120.0) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = httpx.get(url + path, timeout=5)
                if resp.status_code == 200:
                    return resp
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}{path} did not become ready")
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(
            self.global_url + "/v1/status", timeout=10
        ).json()
        return result

    def wait_finished(self, timeout: float, progress: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for name, proc in self.procs.items():
                if proc.popen is None or proc.alive():
                    continue
                # The client runner exits 0 once its clients played every round;
                # any other exit, and any exit of a service, ends the run.
                if name != "clients" or proc.popen.returncode != 0:
                    raise RuntimeError(
                        f"{name} exited with {proc.popen.returncode}; see {proc.log}"
                    )
            try:
                status = self.status()
            except httpx.HTTPError:
                status = None
            if status is not None:
                # Records are complete once evaluated (they are, in round order).
                history = status["history"]
                done = len(history) - status.get("evaluating", 0)
                for record in history[seen:done]:
                    if progress:
                        progress(record)
                seen = max(seen, done)
                if status["finished"] and status.get("evaluating", 0) == 0:
                    return status
            if time.monotonic() > deadline:
                raise TimeoutError("the run did not finish in time")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        self.procs[name].stop(signal.SIGKILL)

    def restart(self, name: str) -> None:
        proc = self.procs[name]
        proc.stop()
        proc.start()
        if name == "redis":
            self._wait_redis()

    def stop(self) -> None:
        """SIGTERM to each tier at once (clients, galaxies, global, Redis), waiting
        for a tier to exit before the next, so no service loses its peer while it
        still shuts down."""
        galaxies = [n for n in self.procs if n.startswith("galaxy")]
        for tier in (["clients"], galaxies, ["global"], ["redis"]):
            procs = [self.procs[n] for n in tier if n in self.procs]
            for proc in procs:
                proc.send(signal.SIGTERM)
            for proc in procs:
                proc.stop()

    # -- results -----------------------------------------------------------------

    def galaxy_summary(
        self, status: dict[str, Any], byzantine: set[int]
    ) -> dict[str, Any]:
        """As ``simulate``'s: galaxies compromised, isolated (the round each was
        caught in), and false attributions: honest clients a compromised galaxy
        lied about (its ``simulated_galaxy_attack`` log events) in a round it was
        not caught in, whose reputation fell in the state it published."""
        attack = self.config.galaxy_attack
        compromised = [] if attack.galaxy is None else [attack.galaxy]
        caught: dict[int, tuple[int, str]] = {}
        for h in status["history"]:
            for g, kind in (h.get("misbehaved") or {}).items():
                caught.setdefault(int(g), (int(h["round"]), kind))
        false: set[int] = set()
        for g in compromised:
            log = self.out / "logs" / f"galaxy-{g}.log"
            lines = log.read_text().splitlines() if log.exists() else []
            for line in lines:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("event") != "simulated_galaxy_attack":
                    continue
                rnd = int(e["round"])
                if g in caught and caught[g][0] <= rnd:
                    continue
                rep = (
                    self.out / "audit" / "rounds" / f"{rnd:06d}" / f"galaxy-{g}"
                    / "reputation.json"
                )  # fmt: skip
                if not rep.exists():
                    continue
                state = json.loads(rep.read_text())
                initial = self.config.defense.reputation.initial
                for c in e["victims"]:
                    if c in byzantine:
                        continue
                    before = (state["before"] or {}).get("clients", {}).get(str(c))
                    after = (state["after"] or {}).get("clients", {}).get(str(c))
                    b = before["reputation"] if before else initial
                    a = after["reputation"] if after else initial
                    if a < b:
                        false.add(c)
        return {
            "attack": attack.kind if compromised else None,
            "compromised": compromised,
            "isolated": {str(g): r for g, (r, _) in sorted(caught.items())},
            "misbehaviour": {str(g): k for g, (_, k) in sorted(caught.items())},
            "detection_rate": (
                len(set(compromised) & set(caught)) / len(compromised)
                if compromised
                else None
            ),
            "false_isolations": sorted(set(caught) - set(compromised)),
            "false_attributions": len(false),
        }

    def summary(self, status: dict[str, Any], wall: float) -> dict[str, Any]:
        removed: set[int] = set()
        isolated = set(status.get("isolated", []))
        for g in self.galaxy_ports:
            if g in isolated:  # its word counts for nothing (its clients moved)
                continue
            q = httpx.get(self.galaxy_url(g) + "/v1/quarantine", timeout=10).json()
            removed |= set(q["quarantined"]) | set(q["banned"])
        byz = set(choose_byzantine(self.config))
        honest = set(range(self.config.clients.count)) - byz
        last = status["history"][-1] if status["history"] else {}
        out = {
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "detection_rate": len(byz & removed) / len(byz) if byz else None,
            "false_positive_rate": len(honest & removed) / len(honest)
            if honest
            else None,
            "rounds": len(status["history"]),
            "wall_seconds": wall,
            "byzantine_clients": sorted(byz),
            "quarantined_clients": sorted(removed),
            "audit_log": status["audit_log"],
            "galaxies": self.galaxy_summary(status, byz),
        }
        (self.out / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        from protogalaxy.report import defense_name, write_records

        d = self.config.defense
        write_records(
            status["history"],
            self.out,
            title=f"{self.config.byzantine.attack} vs {defense_name(d.layers)} "
            f"({d.aggregator}), protogalaxy up",
        )
        return out

"""The galaxy's Redis under the chart's own ACL: a real redis-server started with the
``users.acl`` that ``helm template`` renders, the galaxy store under galaxy 0's
user, and galaxy 0's user attacking galaxy 1's keys.

Also the store's clean-up without ``SCAN`` (rounds and whole runs deleted through
their indexes), a Redis at ``maxmemory`` (refused writes, nothing evicted), and
the galaxy's client over TLS with a CA of its own (Memorystore).
"""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from protogalaxy.protocol.stores import Phase
from protogalaxy.services.redis_store import RedisGalaxyStore, RunSuperseded, connect
from tests.deploy.conftest import CHART, helm  # noqa: F401  (the helm fixture)

GALAXIES = 2


# -- a real redis-server ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of its own on loopback, in ``workdir``; ``admin`` is a client
    as the default user."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        password: str | None = None,
        port: int | None = None,
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.log = workdir / "redis.log"
        self.argv = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--logfile",
            str(self.log),
            *args,
        ]
        self.proc = subprocess.Popen(self.argv)
        self.admin = redis.Redis(port=self.port, password=password)

    def wait(self, *, ready: bool = True, timeout: float = 30.0) -> None:
        """Until it answers (``ready``: PONG, not LOADING)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.admin.ping()
                return
            except redis.BusyLoadingError:
                if not ready:
                    return
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else ""
                pytest.fail(f"redis-server exited {self.proc.returncode}:\n{log}")
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)

    def url(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the rendered chart ---------------------------------------------------------------


def render(helm_exe: Path, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(helm_exe), "template", "pg", str(CHART), "--namespace", "fl", *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def redis_secret(docs: list[dict[str, Any]]) -> dict[str, bytes]:
    """The in-release Redis Secret's data, decoded."""
    (secret,) = [
        d
        for d in docs
        if d["kind"] == "Secret" and d["metadata"]["name"] == "pg-protogalaxy-redis"
    ]
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


@pytest.fixture(scope="module")
def secret(helm: Path) -> dict[str, bytes]:  # noqa: F811
    return redis_secret(
        render(
            helm,
            "--set",
            f"galaxies.count={GALAXIES}",
            "--set",
            f"clients.count={10 * GALAXIES}",
        )
    )


def password(secret: dict[str, bytes], key: str) -> str:
    return secret[key].decode()


@pytest.fixture(scope="module")
def acl_redis(
    secret: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """redis-server with the rendered users.acl, as the chart's StatefulSet runs it
    (--aclfile)."""
    workdir = tmp_path_factory.mktemp("acl-redis")
    acl = workdir / "users.acl"
    acl.write_bytes(secret["users.acl"])
    server = RedisServer(
        workdir,
        "--appendonly",
        "no",
        "--aclfile",
        str(acl),
        password=password(secret, "redis-password"),
    )
    server.wait()
    yield server
    server.stop()


@pytest.fixture
def server(acl_redis: RedisServer) -> RedisServer:
    acl_redis.admin.flushall()
    acl_redis.admin.acl_log_reset()
    return acl_redis


def galaxy_client(server: RedisServer, secret: dict[str, bytes], g: int) -> redis.Redis:
    pw = password(secret, f"galaxy-{g}-password")
    return connect(server.url(f"galaxy-{g}", pw), password=pw)


def galaxy_store(
    server: RedisServer, secret: dict[str, bytes], g: int, run: str
) -> RedisGalaxyStore:
    return RedisGalaxyStore(galaxy_client(server, secret, g), galaxy=g, run=run)


def keys(server: RedisServer, pattern: str = "*") -> set[str]:
    return {k.decode() for k in server.admin.scan_iter(match=pattern, count=1000)}


def denied(server: RedisServer) -> list[dict[str, Any]]:
    """What the ACL refused since the test started (ACL LOG)."""
    return list(server.admin.acl_log())


def play(store: RedisGalaxyStore, rounds: range, *, gc_keep: int | None = None) -> None:
    """Everything a galaxy does to its store in a round, as the galaxy service
    does it: open, commitments, blobs, staged and plain reveals, a rejection, an
    upload left behind by a killed process, the close, reputations, evidence,
    bookkeeping, and the drop of old rounds (``gc_keep``)."""
    store.register_client(1, b"k" * 32)
    store.register_client(2, b"j" * 32)
    assert store.clients() == [1, 2] and store.client_key(1) == b"k" * 32
    for rnd in rounds:
        assert store.compare_and_set_state(store.get_state(), (rnd, Phase.COMMIT))
        if gc_keep is not None:
            store.drop_rounds_before(rnd - gc_keep)
        store.put_blob(rnd, "opened_at", b"0")
        assert store.add_commitment(rnd, 1, bytes(68), bytes(64))
        assert store.add_commitment(rnd, 2, bytes(68), bytes(64))
        assert len(store.commitments(rnd)) == 2
        assert store.compare_and_set_state((rnd, Phase.COMMIT), (rnd, Phase.REVEAL))
        body = bytes(range(256)) * 8
        stage = store.stage_reveal(rnd, 1, len(body))
        stage.write(body[:1000])
        stage.write(body[1000:])
        assert store.add_reveal(rnd, 1, body, bytes(32), staged=stage)
        assert store.add_reveal(rnd, 2, b"plain", bytes(32))
        assert store.add_rejection(rnd, 3, "shape")
        store.put_blob(rnd, "rejected:3", b"garbage")
        left = store.stage_reveal(rnd, 2, None)  # its process was killed
        left.write(b"partial")
        left.flush()
        assert store.reveals(rnd)[1] == (body, bytes(32))
        assert store.get_reveal(rnd, 2) == (b"plain", bytes(32))
        assert store.reveal_count(rnd) == 2 and store.rejections(rnd) == {3: "shape"}
        assert store.compare_and_set_state(
            (rnd, Phase.REVEAL), (rnd, Phase.AGGREGATING)
        )
        assert store.finish_round(
            rnd,
            blobs={"aggregate": b"agg", "transcript": b"t"},
            reputation={"round": rnd},
            evidence=[{"event": "client_quarantined", "client": 2, "round": rnd}],
        )
        store.drop_stages(rnd)
        store.put_meta("missed", json.dumps({"2": rnd}).encode())
        store.save_reputation({"round": rnd})
        store.append_evidence({"event": "client_banned", "client": 2, "round": rnd})
        assert store.load_reputation() == {"round": rnd}
        assert store.reputation_version() >= 2 * (rnd + 1)
        assert store.get_meta("missed") == json.dumps({"2": rnd}).encode()
        assert len(store.evidence(client=2)) == 2 * (rnd - rounds.start + 1)
        assert store.ping()


def round_keys(prefix: str, rnd: int) -> set[str]:
    """The keys :func:`play` leaves for a round."""
    r = f"{prefix}r:{rnd}:"
    return {
        r + name
        for name in (
            "commitments",
            "reveals",
            "rejections",
            "reveal:1",
            "reveal:2",
            "blobs",
            "blob:opened_at",
            "blob:rejected:3",
            "blob:aggregate",
            "blob:transcript",
        )
    }


# -- the ACL file ---------------------------------------------------------------------


def test_the_acl_holds_password_hashes_only(secret: dict[str, bytes]) -> None:
    import hashlib

    acl = secret["users.acl"].decode()
    lines = acl.splitlines()
    assert [line.split()[1] for line in lines] == ["default"] + [
        f"galaxy-{g}" for g in range(GALAXIES)
    ]
    for line in lines:
        user = line.split()[1]
        key = "redis-password" if user == "default" else f"{user}-password"
        pw = password(secret, key)
        assert len(pw) >= 32
        assert pw not in acl  # never in the clear
        assert not any(token.startswith(">") for token in line.split())
        digest = hashlib.sha256(pw.encode()).hexdigest()
        assert f" #{digest} " in f" {line} "


def test_galaxy_users_are_limited_to_their_prefix_and_the_commands_used(
    secret: dict[str, bytes],
) -> None:
    for g in range(GALAXIES):
        (line,) = [
            x
            for x in secret["users.acl"].decode().splitlines()
            if x.startswith(f"user galaxy-{g} ")
        ]
        tokens = line.split()
        assert [t for t in tokens if t.startswith(("~", "%", "&"))] == [
            f"~pg:galaxy:{g}:*"
        ]
        assert "-@all" in tokens and not [t for t in tokens if t.startswith("+@")]
        allowed = {t[1:] for t in tokens if t.startswith("+")}
        for listing in ("scan", "keys", "randomkey", "eval", "script", "function"):
            assert listing not in allowed
        assert {"evalsha", "script|load", "multi", "exec", "watch"} <= allowed


# -- galaxy 0's user against galaxy 1's keys ------------------------------------------


def test_a_galaxy_user_cannot_reach_another_galaxys_keys(
    server: RedisServer, secret: dict[str, bytes]
) -> None:
    """galaxy-0 can neither read, write, list nor script-touch galaxy 1's keys;
    galaxy 1's data is unchanged afterwards."""
    victim = galaxy_store(server, secret, 1, "run-b")
    victim.begin_run()
    play(victim, range(2))
    before = {k: server.admin.dump(k) for k in keys(server, "pg:galaxy:1:*")}
    assert "pg:galaxy:1:run-b:state" in before

    r0 = galaxy_client(server, secret, 0)
    theirs = "pg:galaxy:1:run-b:state"
    attempts: list[tuple[str, Any]] = [
        ("GET", lambda: r0.get(theirs)),
        ("SET", lambda: r0.set(theirs, b"0:done")),
        ("HGETALL", lambda: r0.hgetall("pg:galaxy:1:run-b:keys")),
        ("HSET", lambda: r0.hset("pg:galaxy:1:run-b:keys", "9", b"x")),
        ("UNLINK", lambda: r0.unlink(theirs)),
        ("RENAME", lambda: r0.rename(theirs, "pg:galaxy:0:stolen")),
        ("RENAME into", lambda: r0.rename("pg:galaxy:0:mine", theirs)),
        ("MGET", lambda: r0.mget(["pg:galaxy:0:x", theirs])),
        ("SMEMBERS", lambda: r0.smembers("pg:galaxy:1:runs")),
        ("WATCH", lambda: r0.execute_command("WATCH", theirs)),
        # listing key names
        ("SCAN", lambda: r0.scan(0, match="pg:galaxy:1:*")),
        ("KEYS", lambda: r0.keys("pg:galaxy:1:*")),
        ("RANDOMKEY", lambda: r0.randomkey()),
        ("DBSIZE", lambda: r0.dbsize()),
        # scripts: only EVALSHA of a loaded script, and its keys are checked
        ("EVAL", lambda: r0.eval("return redis.call('GET', KEYS[1])", 1, theirs)),
        ("SCRIPT FLUSH", lambda: r0.script_flush()),
        ("FUNCTION", lambda: r0.execute_command("FUNCTION", "LIST")),
        # nothing else of the server
        ("FLUSHALL", lambda: r0.flushall()),
        ("CONFIG", lambda: r0.config_get("*")),
        ("ACL", lambda: r0.acl_list()),
        ("CLIENT", lambda: r0.client_list()),
        ("MONITOR", lambda: r0.execute_command("MONITOR")),
        ("SAVE", lambda: r0.execute_command("SAVE")),
        ("FLUSHDB", lambda: r0.flushdb()),
        ("SELECT", lambda: r0.execute_command("SELECT", "1")),
    ]
    for what, attempt in attempts:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(f"galaxy-0 ran {what} on galaxy 1's keys")

    # A script galaxy 0 may load cannot touch galaxy 1's keys, named in KEYS or
    # built inside the script.
    read = r0.script_load("return redis.call('GET', KEYS[1])")
    with pytest.raises(redis.exceptions.NoPermissionError):
        r0.evalsha(read, 1, theirs)
    sneaky = r0.script_load(
        "redis.call('SET', 'pg:galaxy:' .. ARGV[1] .. ':run-b:state', 'x')"
        " return redis.call('GET', 'pg:galaxy:' .. ARGV[1] .. ':run-b:keys')"
    )
    with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
        r0.evalsha(sneaky, 0, "1")
    assert r0.evalsha(read, 1, "pg:galaxy:0:nothing") is None  # its own: fine

    after = {k: server.admin.dump(k) for k in keys(server, "pg:galaxy:1:*")}
    assert after == before
    assert not keys(server, "pg:galaxy:0:*")
    assert victim.get_state() == (1, Phase.DONE)


def test_a_wrong_or_missing_password_is_refused(
    server: RedisServer, secret: dict[str, bytes]
) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError):
        connect(server.url("galaxy-0", "not-the-password")).ping()
    other = password(secret, "galaxy-1-password")
    with pytest.raises(redis.exceptions.AuthenticationError):
        connect(server.url("galaxy-0", other)).ping()  # galaxy 1's password
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port).ping()  # the default user has a password too


# -- the store's workload under its galaxy's user ---------------------------------


def test_the_galaxy_workload_runs_under_its_own_user(
    server: RedisServer, secret: dict[str, bytes]
) -> None:
    """Every command the store sends is allowed (ACL LOG stays empty), and
    dropping rounds by index leaves exactly the rounds in the window."""
    store = galaxy_store(server, secret, 0, "r1")
    assert store.begin_run() == []
    play(store, range(6), gc_keep=2)
    assert denied(server) == []
    p = "pg:galaxy:0:r1:"
    run_wide = {
        p + name
        for name in (
            "state",
            "keys",
            "reputation",
            "reputation_version",
            "evidence",
            "gc_floor",
            "metas",
            "meta:missed",
        )
    }
    # round 5 opened with drop_rounds_before(3): rounds 3, 4 and 5 are left
    expected = run_wide | round_keys(p, 3) | round_keys(p, 4) | round_keys(p, 5)
    assert keys(server) == expected | {"pg:galaxy:0:runs"}
    store.drop_round(5)
    assert keys(server) == expected - round_keys(p, 5) | {"pg:galaxy:0:runs"}


def test_old_runs_are_deleted_when_a_galaxy_starts_a_run(
    server: RedisServer, secret: dict[str, bytes]
) -> None:
    """Starting run b deletes every key of run a (by its indexes, under the
    galaxy's own user), leaves other galaxies alone, and run a cannot come back."""
    neighbour = galaxy_store(server, secret, 1, "a")
    neighbour.begin_run()
    play(neighbour, range(2))
    theirs = keys(server, "pg:galaxy:1:*")

    old = galaxy_store(server, secret, 0, "a")
    assert old.begin_run() == []
    play(old, range(4), gc_keep=1)
    stage = old.stage_reveal(3, 1, 100)  # an upload in flight when the run ended
    stage.write(b"x" * 100)
    stage.flush()
    assert any(k.startswith("pg:galaxy:0:a:") for k in keys(server))

    new = galaxy_store(server, secret, 0, "b")
    assert new.begin_run() == ["a"]
    assert keys(server, "pg:galaxy:0:*") == {"pg:galaxy:0:runs"}
    assert keys(server, "pg:galaxy:1:*") == theirs
    play(new, range(1))
    assert new.begin_run() == []  # a restart of run b keeps its keys
    assert new.get_state() == (0, Phase.DONE)
    with pytest.raises(RunSuperseded, match="superseded by run 'b'"):
        galaxy_store(server, secret, 0, "a").begin_run()

    third = galaxy_store(server, secret, 0, "c")
    old.put_meta("late", b"x")  # a pod of run a, still up, writes again
    assert third.begin_run() == ["a", "b"]  # a again: what the zombie wrote
    assert keys(server, "pg:galaxy:0:*") == {"pg:galaxy:0:runs"}
    assert denied(server) == []


def test_a_new_run_starts_on_a_redis_full_of_the_last_one(
    server: RedisServer, secret: dict[str, bytes]
) -> None:
    """noeviction refuses writes at maxmemory, never deletions: the new run frees
    the old run's keys before it registers, so it starts (the review found it
    could not, and the galaxy crash-looped for good)."""
    old = galaxy_store(server, secret, 0, "a")
    old.begin_run()
    for i in range(32):
        old.put_meta(f"fill{i}", b"x" * (256 * 1024))  # 8 MiB of run a
    used = int(server.admin.info("memory")["used_memory"])
    server.admin.config_set("maxmemory", used - 2 * 1024 * 1024)  # now full
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            old.put_meta("one-more", b"x")
        new = galaxy_store(server, secret, 0, "b")
        assert new.begin_run() == ["a"]
        assert keys(server, "pg:galaxy:0:a:*") == set()
    finally:
        server.admin.config_set("maxmemory", 0)


def test_bad_run_ids_and_arguments_are_refused(server: RedisServer) -> None:
    client = server.admin
    for run in ("", "a:b", "a*", "../x", "a b", "x" * 129):
        with pytest.raises(ValueError, match="run id"):
            RedisGalaxyStore(client, galaxy=0, run=run)
    with pytest.raises(ValueError, match="not both"):
        RedisGalaxyStore(client, galaxy=0, run="a", prefix="p:")
    with pytest.raises(TypeError, match="galaxy"):
        RedisGalaxyStore(client, galaxy="0", run="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="begin_run"):
        RedisGalaxyStore(client, galaxy=0, prefix="p:").begin_run()
    with pytest.raises(ValueError, match="PG_REDIS_URL"):
        connect("localhost:6379")


# -- maxmemory -----------------------------------------------------------------------


def test_at_maxmemory_writes_are_refused_and_nothing_is_evicted(
    tmp_path: Path,
) -> None:
    """noeviction: past maxmemory the store's writes fail with a clear error,
    every accepted update is still there, and dropping rounds still works."""
    server = RedisServer(
        tmp_path,
        "--appendonly",
        "no",
        "--maxmemory",
        "3mb",
        "--maxmemory-policy",
        "noeviction",
    )
    try:
        server.wait()
        store = RedisGalaxyStore(
            connect(f"redis://127.0.0.1:{server.port}/0"), galaxy=0
        )
        store.compare_and_set_state(None, (0, Phase.REVEAL))
        body = bytes(256 << 10)
        accepted = []
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
            for client in range(100):
                assert store.add_reveal(0, client, body, bytes(32))
                accepted.append(client)
        assert accepted and len(accepted) < 100
        assert sorted(store.reveals(0)) == accepted  # none evicted
        # Well past it (the refused command's buffers are freed again): every kind
        # of write the store makes is refused, reads still answer.
        server.admin.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            store.compare_and_set_state((0, Phase.REVEAL), (0, Phase.AGGREGATING))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            stage = store.stage_reveal(0, 999, len(body))
            stage.write(body)
            store.add_reveal(0, 999, body, bytes(32), staged=stage)
        server.admin.config_set("maxmemory", "3mb")
        store.drop_round(0)  # deletes are allowed: the memory comes back
        assert store.reveals(0) == {}
        store.compare_and_set_state((0, Phase.REVEAL), (1, Phase.COMMIT))
    finally:
        server.stop()


# -- TLS with the server's own CA (Memorystore) -----------------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and a second CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def pem_key(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def ca(name: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256())
        )
        paths[name] = directory / f"{name}.crt"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    ca_key, ca_cert = ca("ca")
    ca("other-ca")
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths["server"] = directory / "server.crt"
    paths["server"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["server-key"] = directory / "server.key"
    paths["server-key"].write_bytes(pem_key(key))
    paths["server-key"].chmod(0o600)
    return paths


def test_the_galaxy_trusts_the_redis_ca_it_is_given_over_tls(tmp_path: Path) -> None:
    """rediss:// with PG_REDIS_CA_FILE: the galaxy's store works against a TLS
    redis-server whose certificate that CA signed, and refuses one it did not
    sign (a server in the middle). The password, with characters a URL cannot
    carry, goes in the URL as Kubernetes expands it."""
    certs = _certificates(tmp_path / "certs")
    secret = "p@ss/w:rd%20#?"
    (tmp_path / "auth.conf").write_text(f'requirepass "{secret}"\n')
    port = free_port()
    server = RedisServer(
        tmp_path / "data",
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(certs["server"]),
        "--tls-key-file",
        str(certs["server-key"]),
        "--tls-ca-cert-file",
        str(certs["ca"]),
        "--tls-auth-clients",
        "no",
        "--appendonly",
        "no",
        "--include",
        str(tmp_path / "auth.conf"),
    )
    try:
        url = f"rediss://:{secret}@127.0.0.1:{port}/0"  # $(PG_REDIS_PASSWORD) expanded
        deadline = time.monotonic() + 30
        while True:
            try:
                store = RedisGalaxyStore.from_url(
                    url, galaxy=0, run="tls", password=secret, ca_file=str(certs["ca"])
                )
                assert store.ping()
                break
            except redis.ConnectionError:
                assert server.proc.poll() is None, server.log.read_text()
                assert time.monotonic() < deadline, (
                    "the TLS redis-server never answered"
                )
                time.sleep(0.1)
        assert store.begin_run() == []
        play(store, range(2), gc_keep=1)
        assert store.get_state() == (1, Phase.DONE)
        # Another CA did not sign the server's certificate: no connection.
        wrong = RedisGalaxyStore.from_url(
            url, galaxy=0, run="tls", password=secret, ca_file=str(certs["other-ca"])
        )
        with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
            wrong.ping()
        # Nor without the CA (the system's CAs did not sign it either).
        bare = RedisGalaxyStore.from_url(url, galaxy=0, run="tls", password=secret)
        with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
            bare.ping()
        # A CA file only makes sense over TLS, and must exist.
        with pytest.raises(ValueError, match="rediss://"):
            connect(f"redis://127.0.0.1:{port}/0", ca_file=str(certs["ca"]))
        with pytest.raises(ValueError, match="not a readable file"):
            connect(url, ca_file=str(tmp_path / "missing.crt"))
    finally:
        server.stop()


# -- the galaxy service under its ACL user ---------------------------------------------


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


@pytest.mark.slow
def test_the_galaxy_service_plays_rounds_under_its_acl_user(
    acl_redis: RedisServer, secret: dict[str, bytes], tmp_path: Path
) -> None:
    """The real galaxy and global aggregator processes, galaxy 0 on the chart's
    Redis as galaxy-0 (URL and password as the rendered pod gets them): it deletes
    its older run's keys when it starts, plays three rounds dropping old ones,
    answers a write Redis has no memory for with a logged 503, and the ACL never
    refuses it anything."""
    from protogalaxy.config import load_config
    from protogalaxy.services.up import LocalCluster
    from tests.services.players import Players, update

    server = acl_redis
    server.admin.flushall()
    server.admin.acl_log_reset()
    # What is there before: an older run of galaxy 0, and galaxy 1's run.
    old = galaxy_store(server, secret, 0, "older-run")
    old.begin_run()
    play(old, range(2))
    neighbour = galaxy_store(server, secret, 1, "up-neighbour")
    neighbour.begin_run()
    play(neighbour, range(1))
    theirs = {k: server.admin.dump(k) for k in keys(server, "pg:galaxy:1:*")}

    n = 2
    config = load_config(
        overrides={
            "clients.count": n,
            "galaxies.count": 1,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
            "defense.layers": [1],
            "defense.aggregator": "fedavg",
            "training.rounds": 3,
        }
    )
    cluster = LocalCluster(
        config,
        tmp_path / "run",
        commit_deadline_s=600,
        reveal_deadline_s=600,
        evaluate=False,
        extra_env={"PG_KEEP_ROUNDS": "1"},
    )
    pw = password(secret, "galaxy-0-password")
    procs = cluster.plan()
    # The pod's environment: the URL with the password expanded into it (as
    # Kubernetes does with $(PG_REDIS_PASSWORD)), and the password itself.
    procs["galaxy-0"].env["PG_REDIS_URL"] = server.url("galaxy-0", pw)
    procs["galaxy-0"].env["PG_REDIS_PASSWORD"] = pw
    try:
        procs["global"].start()
        procs["galaxy-0"].start()
        cluster.wait_ready(cluster.galaxy_url(0), "/readyz")
        p = Players(cluster, n)
        p.register()
        run = f"pg:galaxy:0:{cluster.run_id}:"
        for rnd in range(3):
            p.wait_phase(rnd, "commit")
            ups = {c: update(10 * rnd + c) for c in range(n)}
            if rnd == 2:
                # Redis at its limit: the galaxy answers 503 (clients retry) and
                # says why; nothing is evicted.
                server.admin.config_set("maxmemory", "1")
                refused = _commit_raw(p, rnd, 0, ups[0])
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"] == "store_unavailable"
                assert "OutOfMemoryError" in refused.json()["detail"]
                server.admin.config_set("maxmemory", "0")
            for c, u in ups.items():
                p.commit(rnd, c, u)
            p.wait_phase(rnd, "reveal")
            for c in range(n):
                assert p.reveal(rnd, c).status_code == 202
            p.wait_global_round(rnd + 1)
        mine = keys(server, "pg:galaxy:0:*")
        # The older run is gone; round 0 was dropped when round 2 opened.
        assert not [k for k in mine if k.startswith("pg:galaxy:0:older-run:")]
        assert not [k for k in mine if k.startswith(f"{run}r:0:")]
        assert [k for k in mine if k.startswith(f"{run}r:1:")]
        assert f"{run}state" in mine
        assert {k: server.admin.dump(k) for k in keys(server, "pg:galaxy:1:*")} == (
            theirs
        )
        assert denied(server) == []  # the ACL never refused the galaxy anything
    finally:
        cluster.stop()
    events = _log_events(cluster.out / "logs" / "galaxy-0.log")
    (deleted,) = [e for e in events if e.get("event") == "old_runs_deleted"]
    assert deleted["deleted"] == ["older-run"] and deleted["galaxy"] == 0
    assert [
        e
        for e in events
        if e.get("event") == "request_rejected"
        and e.get("reason") == "store_unavailable"
        and "OutOfMemoryError" in e.get("detail", "")
    ]


def _commit_raw(p: Any, rnd: int, client: int, tensors: Any) -> Any:
    """A client's commitment, the answer as it is (Players.commit wants 202)."""
    import httpx

    from protogalaxy.crypto import commit
    from protogalaxy.crypto.identity import sign_commitment

    com, _ = commit(tensors, client_id=client, galaxy_id=0, round=rnd)
    sig = sign_commitment(p.keys[client], com, run=p.run)
    return httpx.post(
        p.url("/v1/commitments"),
        json={"commitment": com.to_dict(), "signature": sig.hex()},
    )

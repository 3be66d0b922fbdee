"""Abuse, on real processes and loopback only, each bounded in count and time:
idle and half-sent connections, long polls, partial reveals. During each, honest
clients' requests are answered within their normal timeout and the round
completes; every refusal is counted by reason.

The abuser connects from 127.0.0.2 (Linux routes all of 127/8 to loopback): the
services limit connections per peer address, and the honest players are on
127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from protogalaxy.services.up import LocalCluster
from tests.services.players import Players, played_cluster, update

pytestmark = pytest.mark.slow

N = 4
ABUSER = ("127.0.0.2", 0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    yield from played_cluster(
        tmp_path,
        clients=N,
        extra_env={
            "PG_MAX_CONNECTIONS_PER_PEER": "32",
            "PG_HEADER_TIMEOUT_S": "3",
            "PG_BODY_IDLE_TIMEOUT_S": "3",
            "PG_MAX_LONG_POLLS": "8",
        },
        **{"training.rounds": 3},
    )


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return socket.create_connection(
        (parts.hostname, parts.port), timeout=10, source_address=ABUSER
    )


def refusals(url: str) -> dict[str, float]:
    """``protogalaxy_http_refused_total`` of a service, by reason."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("protogalaxy_http_refused_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def peak_rss_mb(cluster: LocalCluster, name: str) -> float:
    popen = cluster.procs[name].popen
    assert popen is not None
    for line in Path(f"/proc/{popen.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def play_round(p: Players, rnd: int) -> None:
    """An honest round, each request with the players' normal (httpx) timeout."""
    p.wait_phase(rnd, "commit")
    for c in range(N):
        p.commit(rnd, c, update(10 * rnd + c))
    p.wait_phase(rnd, "reveal")
    for c in range(N):
        assert p.reveal(rnd, c).status_code == 202
    p.wait_global_round(rnd + 1, timeout=60)


def test_idle_and_half_sent_connections(cluster: LocalCluster) -> None:
    """300 idle and 300 half-sent connections, to the galaxy and to the global
    aggregator: beyond 32 a peer is refused at once (503), the ones it holds are
    closed after the header timeout, and the honest round goes on meanwhile."""
    p = Players(cluster, N)
    p.register()
    targets = [cluster.galaxy_url(0), cluster.global_url]
    rss = {name: peak_rss_mb(cluster, name) for name in ("galaxy-0", "global")}
    held: list[socket.socket] = []
    try:
        for i in range(600):
            target = targets[i % 2]
            sock = connect(target)
            if i >= 300:  # half-sent: a request line and part of the headers
                sock.sendall(b"POST /v1/commitments HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        play_round(p, 0)
        # The ones a service took are closed after its header timeout (3 s).
        deadline = time.monotonic() + 20
        for target in targets:
            while refusals(target).get("header_timeout", 0) < 32:
                assert time.monotonic() < deadline, refusals(target)
                time.sleep(0.2)
    finally:
        for sock in held:
            sock.close()
    for target in targets:
        assert refusals(target).get("too_many_connections", 0) == 300 - 32
    for name, before in rss.items():
        assert peak_rss_mb(cluster, name) < before + 100


def test_long_polls_need_a_credential_and_have_their_own_limit(
    cluster: LocalCluster,
) -> None:
    """300 long polls without a token: 401 at once. With the service token, 30
    at once: at most 8 wait (the galaxy's own among them; the rest: 429), and
    the galaxy, which long-polls too, keeps the run going."""
    p = Players(cluster, N)
    p.register()
    rss = peak_rss_mb(cluster, "global")
    status_url = cluster.global_url + "/v1/status"
    view = cluster.status()["view"]
    with httpx.Client(timeout=10) as client:
        for _ in range(300):
            resp = client.get(status_url, params={"view": view, "wait_s": 30})
            assert resp.status_code == 401
            assert resp.json()["error"] == "bad_signature"
    token = {"authorization": f"Bearer {cluster.service_token}"}
    answers: list[int] = []

    def poll() -> None:
        # From an address of their own, under its connection limit (32).
        transport = httpx.HTTPTransport(local_address="127.0.0.3")
        with httpx.Client(transport=transport, timeout=30) as client:
            resp = client.get(
                status_url, params={"view": view, "wait_s": 20}, headers=token
            )
        answers.append(resp.status_code)

    pollers = 30
    threads = [threading.Thread(target=poll) for _ in range(pollers)]
    for t in threads:
        t.start()
    # The galaxy's own long poll holds one of the 8 places: at most 7 of these
    # wait (until the view changes), the others are refused at once.
    deadline = time.monotonic() + 20
    while len(answers) < pollers - 7:
        assert time.monotonic() < deadline, answers
        time.sleep(0.05)
    assert set(answers) == {429}
    play_round(p, 0)  # the view changes: the waiting ones are answered
    for t in threads:
        t.join(timeout=30)
    assert len(answers) == pollers and set(answers) == {200, 429}
    assert answers.count(200) <= 8
    assert peak_rss_mb(cluster, "global") < rss + 100


def test_partial_reveals_hold_no_more_than_they_sent(cluster: LocalCluster) -> None:
    """64 partial reveals, each declaring a body of the model's size (the only
    size a reveal may have) and sending half of it, then stalling: Redis holds
    less than twice one round's honest data, each stalled upload is cut after
    the body timeout (and counted, with no traceback), and the honest reveals
    (the stalled client's own included, afterwards) are taken."""
    p = Players(cluster, N)
    p.register()
    p.wait_phase(0, "commit")
    for c in range(N):
        p.commit(0, c, update(c))
    p.wait_phase(0, "reveal")
    rss = peak_rss_mb(cluster, "galaxy-0")
    _, nonce, body = p.made[3]
    size = len(body)  # what every reveal of this model is
    honest_bytes = N * size
    r = cluster.redis_client()
    before = int(r.info("memory")["used_memory"])
    held = []
    try:
        for _ in range(64):
            sock = connect(cluster.galaxy_url(0))
            head = (
                f"PUT /v1/rounds/0/reveals/3 HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {size}\r\nX-PG-Nonce: {nonce.hex()}\r\n"
                f"X-PG-Signature: {'00' * 64}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[: size // 2])
            held.append(sock)
        time.sleep(0.5)
        grown = int(r.info("memory")["used_memory"]) - before
        assert grown < 2 * honest_bytes, (grown, honest_bytes)
        for c in range(3):
            assert p.reveal(0, c).status_code == 202
        # 32 are taken (the per-peer limit), the others refused at once; the
        # taken ones are cut when their body stalls for 3 s.
        deadline = time.monotonic() + 30
        while refusals(cluster.galaxy_url(0)).get("body_timeout", 0) < 32:
            assert time.monotonic() < deadline, refusals(cluster.galaxy_url(0))
            time.sleep(0.2)
        assert refusals(cluster.galaxy_url(0))["too_many_connections"] == 64 - 32
    finally:
        for sock in held:
            sock.close()
    assert p.reveal(0, 3).status_code == 202
    p.wait_global_round(1, timeout=60)
    stages = list(r.scan_iter(match="pg:galaxy:0:*:stage:*"))
    assert stages == []
    # Each cut upload is a counted refusal, not a traceback in the log.
    metrics = httpx.get(cluster.galaxy_url(0) + "/metrics").text
    line = 'protogalaxy_galaxy_rejected_total{reason="client_disconnected"}'
    assert float(metrics.split(line, 1)[1].split()[0]) >= 32
    assert "Traceback" not in (cluster.out / "logs" / "galaxy-0.log").read_text()
    assert peak_rss_mb(cluster, "galaxy-0") < rss + 100

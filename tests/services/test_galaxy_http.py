"""The galaxy service over real HTTP: a real redis-server, real uvicorn processes for
the global aggregator and a galaxy; the test plays the clients.

Bad input is answered 4xx with a reason, counted in /metrics, and leaves the stores
as they were; the service keeps serving and the round completes.
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from protogalaxy.codec import encode_update
from protogalaxy.config import load_config
from protogalaxy.crypto import SigningKey, VerifyKey, commit, verify_receipt
from protogalaxy.crypto.identity import sign_commitment
from protogalaxy.crypto.receipts import Receipt
from protogalaxy.services.up import LocalCluster
from tests.services.players import Players, update

pytestmark = pytest.mark.slow

CLIENTS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    config = load_config(
        overrides={
            "clients.count": CLIENTS,
            "galaxies.count": 1,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
            "training.rounds": 3,
        }
    )
    c = LocalCluster(
        config,
        Path(tmp_path_factory.mktemp("galaxy-http")),
        commit_deadline_s=600,
        reveal_deadline_s=600,
        max_update_bytes=200_000,
    )
    try:
        c.start(clients=False)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def players(cluster: LocalCluster) -> Players:
    return Players(cluster, CLIENTS)


def url(c: LocalCluster, path: str) -> str:
    return c.galaxy_url(0) + path


def metric(c: LocalCluster, name: str, **labels: str) -> float:
    text = httpx.get(url(c, "/metrics")).text
    want = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def refused(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == reason, resp.text


def test_enrollment_admits_only_the_provisioned_credential_of_an_id(
    cluster: LocalCluster, players: Players
) -> None:
    """No shared enrollment secret: an id is admitted only with the key the
    operator provisioned for it, proven by a signed registration; ids that cannot
    take part are refused and never count in the quorum."""
    register = url(cluster, "/v1/register")
    good = players.registration(0)
    minted = SigningKey.generate()
    attempts = [
        # a key the caller minted, for a real id: not that id's credential
        (
            {**good, "public_key": minted.public_key.to_bytes().hex()},
            401,
            "bad_signature",
        ),
        # the real public key, but a signature the caller cannot make
        ({**good, "signature": "00" * 64}, 401, "bad_signature"),
        # another client's valid registration replayed under this id
        ({**players.registration(1), "client_id": 0}, 401, "bad_signature"),
        ({**good, "client_id": -1}, 422, "bad_client_id"),
        ({**good, "client_id": CLIENTS}, 422, "bad_client_id"),
        ({**good, "client_id": 2**64}, 422, "bad_client_id"),
        ({**good, "client_id": 1.0}, 422, "malformed"),
        ({**good, "client_id": "0"}, 422, "malformed"),
        ({**good, "client_id": True}, 422, "malformed"),
        ({**good, "public_key": "zz"}, 422, "malformed"),
    ]
    for body, status, reason in attempts:
        refused(httpx.post(register, json=body), status, reason)
    # Nothing was registered: the quorum's base is untouched.
    store = cluster.redis_client()
    assert store.hlen(f"pg:galaxy:0:{cluster.run_id}:keys") == 0
    assert (
        metric(cluster, "protogalaxy_galaxy_rejected_total", reason="bad_signature")
        >= 3
    )
    assert (
        metric(cluster, "protogalaxy_galaxy_rejected_total", reason="bad_client_id")
        >= 3
    )
    players.register()
    players.register()  # again, as a restarted client does: accepted


def test_a_round_with_every_kind_of_bad_input(
    cluster: LocalCluster, players: Players
) -> None:
    players.wait_phase(0, "commit")
    # -- commit phase --
    stranger = SigningKey.generate()
    com, _ = commit(update(9), client_id=99, galaxy_id=0, round=0)
    refused(
        httpx.post(
            url(cluster, "/v1/commitments"),
            json={
                "commitment": com.to_dict(),
                "signature": sign_commitment(stranger, com, run=cluster.run_id).hex(),
            },
        ),
        404,
        "unknown_client",
    )
    com1, _ = commit(update(1), client_id=1, galaxy_id=0, round=0)
    refused(
        httpx.post(
            url(cluster, "/v1/commitments"),
            json={
                "commitment": com1.to_dict(),
                "signature": sign_commitment(
                    players.keys[2], com1, run=cluster.run_id
                ).hex(),
            },
        ),
        401,
        "bad_signature",
    )
    refused(
        httpx.post(url(cluster, "/v1/commitments"), content=b"{not json"),
        422,
        "malformed",
    )
    future, _ = commit(update(1), client_id=1, galaxy_id=0, round=5)
    refused(
        httpx.post(
            url(cluster, "/v1/commitments"),
            json={
                "commitment": future.to_dict(),
                "signature": sign_commitment(
                    players.keys[1], future, run=cluster.run_id
                ).hex(),
            },
        ),
        409,
        "wrong_phase",
    )
    # Client 2 commits honestly to a NaN update; client 3 to a wrong-shape update
    # of the right size (a reveal of another size is refused before it is read).
    nan = update(2)
    nan["fc2.bias"] = torch.full((10,), math.nan)
    wrong_shape = {k: v for k, v in update(3).items()}
    wrong_shape["fc2.weight"] = wrong_shape["fc2.weight"].T.contiguous()
    for c, tensors in enumerate([update(0), update(1), nan, wrong_shape]):
        players.commit(0, c, tensors)
    made = players.made
    players.wait_phase(0, "reveal")
    # -- reveal phase: receipts verify against the pinned global key --
    global_key = VerifyKey.from_bytes(bytes.fromhex(cluster.global_public_key))
    for c, (com_c, _, _) in made.items():
        r = Receipt.from_dict(
            httpx.get(url(cluster, f"/v1/rounds/0/receipts/{c}")).json()
        )
        verify_receipt(
            r, global_key=global_key, run=cluster.run_id, commitment=com_c, round=0
        )
    accepted_before = metric(cluster, "protogalaxy_galaxy_updates_accepted_total")
    body0 = made[0][2]
    # A reveal has one exact size: without a Content-Length, or with another,
    # it is refused before a byte of it is read or staged.
    refused(players.reveal(0, 0, chunked=True), 411, "length_required")
    refused(players.reveal(0, 0, body=body0 + b"\x00"), 422, "wrong_size")
    refused(
        httpx.put(
            url(cluster, "/v1/rounds/0/reveals/0"),
            content=body0,
            headers={"x-pg-nonce": "00" * 31, "x-pg-signature": "00" * 64},
        ),
        422,
        "malformed",
    )
    assert players.reveal(0, 0).status_code == 202
    # Same-round refusals first: the fourth answered reveal completes the quorum,
    # and the galaxy then closes the round at once.
    refused(players.reveal(0, 0, body=encode_update(update(8))), 409, "duplicate")
    refused(
        httpx.put(
            url(cluster, "/v1/rounds/0/reveals/1"),
            content=body0,
            headers={"x-pg-nonce": "zz", "x-pg-signature": "00"},
        ),
        422,
        "malformed",
    )
    refused(players.reveal(1, 0), 409, "wrong_phase")
    # a body over the limit: 413 before it is read whole
    big = httpx.put(
        url(cluster, "/v1/rounds/0/reveals/1"),
        content=b"\x00" * 300_000,
        headers={"x-pg-nonce": "00" * 32, "x-pg-signature": "00" * 64},
    )
    refused(big, 413, "too_large")
    streamed_big = httpx.put(
        url(cluster, "/v1/rounds/0/reveals/1"),
        content=(b"\x00" * 50_000 for _ in range(6)),  # no Content-Length
        headers={"x-pg-nonce": "00" * 32, "x-pg-signature": "00" * 64},
    )
    refused(streamed_big, 411, "length_required")
    refused(
        players.reveal(0, 1, body=encode_update(update(7))), 422, "commitment_mismatch"
    )
    refused(players.reveal(0, 2), 422, "non_finite")
    refused(players.reveal(0, 3), 422, "shape")
    assert (
        metric(cluster, "protogalaxy_galaxy_updates_accepted_total")
        == accepted_before + 1
    )
    # Refused bodies were streamed into stages in Redis as they arrived; none is
    # left behind (a stage is removed once its upload's last write is done).
    store = cluster.redis_client()
    deadline = time.monotonic() + 10
    while stages := list(store.scan_iter(match="pg:galaxy:0:*:stage:*")):
        assert time.monotonic() < deadline, f"stages left behind: {stages}"
        time.sleep(0.05)
    for reason in (
        "too_large",
        "commitment_mismatch",
        "non_finite",
        "shape",
        "duplicate",
    ):
        assert (
            metric(cluster, "protogalaxy_galaxy_rejected_total", reason=reason) >= 1
        ), reason
    # The service still serves, and the round completes at quorum (every commitment
    # answered: one accepted, three rejected).
    assert httpx.get(url(cluster, "/readyz")).status_code == 200
    deadline = time.monotonic() + 60
    while httpx.get(cluster.global_url + "/v1/status").json()["round"] < 1:
        assert time.monotonic() < deadline, "round 0 did not complete"
        time.sleep(0.1)
    # The mismatching reveal cost client 1 reputation, with evidence kept per client.
    state = httpx.get(url(cluster, "/v1/clients/1")).json()
    assert (
        state["reputation"]
        < 0.5
        < httpx.get(url(cluster, "/v1/clients/0")).json()["reputation"]
    )
    refused(httpx.get(url(cluster, "/v1/clients/77")), 404, "unknown_client")


def test_an_old_commitment_replayed_in_a_later_round(
    cluster: LocalCluster, players: Players
) -> None:
    players.wait_phase(1, "commit")
    old, _ = commit(update(0), client_id=0, galaxy_id=0, round=0)
    refused(
        httpx.post(
            url(cluster, "/v1/commitments"),
            json={
                "commitment": old.to_dict(),
                "signature": sign_commitment(
                    players.keys[0], old, run=cluster.run_id
                ).hex(),
            },
        ),
        409,
        "wrong_phase",
    )
    text = httpx.get(url(cluster, "/metrics")).text
    assert "protogalaxy_galaxy_rounds_completed_total 1.0" in text


def raw_post(
    target: str,
    *,
    declared: int,
    sent: int = 0,
    body: bytes | None = None,
    extra: str = "",
) -> tuple[int, Any]:
    """POST declaring ``declared`` bytes and sending ``sent`` of them, or
    ``body`` (a client library would refuse to), with ``extra`` header lines:
    the status and JSON of the answer."""
    parts = urllib.parse.urlsplit(target)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        )
        payload = b"{" + b" " * (sent - 1) if body is None else body
        sock.sendall(head.encode() + payload)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
        ):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_odd_framing_and_odd_json_are_refused_in_the_error_format(
    cluster: LocalCluster,
) -> None:
    """What an attack review found: a Content-Length with a Transfer-Encoding
    (h11 frames by the encoding: the declared size would be a claim, and 64 MiB
    went into a capped endpoint), JSON nested 2000 deep (a RecursionError was a
    500 with a traceback), and Starlette's own refusals (unknown route, wrong
    method) that skipped the error format, the log and the count."""
    chunk = json.dumps(
        {"client_id": 0, "public_key": "00" * 32, "signature": "00" * 64}
        | {"pad": "x" * (64 << 10)}  # over the cap: it must never be read
    ).encode()
    encoded = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
    status, answer = raw_post(
        url(cluster, "/v1/register"),
        declared=2,
        body=encoded,
        extra="Transfer-Encoding: chunked\r\n",
    )
    assert (status, answer["error"]) == (400, "malformed"), answer
    deep = b"[" * 2000 + b"]" * 2000
    token = {"authorization": f"Bearer {cluster.service_token}"}
    for target, want, headers in (
        (f"{cluster.global_url}/v1/rounds/0/acks", 422, {}),
        (f"{cluster.global_url}/v1/rounds/0/leaves", 422, token),
        (url(cluster, "/v1/register"), 400, {}),
        (url(cluster, "/v1/commitments"), 400, {}),
    ):
        typed = {"content-type": "application/json", **headers}
        resp = httpx.post(target, content=deep, headers=typed)
        refused(resp, want, "malformed")
    refused(httpx.get(url(cluster, "/v1/no-such-thing")), 404, "not_found")
    refused(httpx.delete(url(cluster, "/v1/commitments")), 405, "method_not_allowed")
    assert metric(cluster, "protogalaxy_galaxy_rejected_total", reason="not_found")
    lines = (cluster.out / "logs" / "global.log").read_text().splitlines()
    deep_ones = [line for line in lines if "RecursionError" in line]
    assert deep_ones and all('"request_rejected"' in line for line in deep_ones)
    assert not any("Exception in ASGI application" in line for line in lines)


def test_json_bodies_are_capped_before_they_are_read(cluster: LocalCluster) -> None:
    """Every JSON endpoint of both services refuses a body over its cap (8 KiB;
    4 KiB for acknowledgements) from its Content-Length, before reading or
    parsing any of it (413), and one without a Content-Length (411); the
    refusal is in the project's error format, logged and counted. Bounded: one
    request per endpoint, each declaring 200 MB and sending 64 KiB at most."""
    glob = cluster.global_url
    endpoints = [
        (url(cluster, "/v1/register"), 0),
        (url(cluster, "/v1/commitments"), 0),
        (f"{glob}/v1/rounds/0/leaves", 1),
        (f"{glob}/v1/rounds/0/abstentions/0", 1),
        (f"{glob}/v1/rounds/0/acks", 1),
    ]
    before = metric(cluster, "protogalaxy_galaxy_rejected_total", reason="too_large")
    for target, _ in endpoints:
        status, answer = raw_post(target, declared=200 << 20, sent=64 << 10)
        assert (status, answer["error"]) == (413, "too_large"), answer
        chunked = httpx.post(target, content=iter([b"{", b"}"]))
        refused(chunked, 411, "length_required")
    # counted (the galaxy's two endpoints; the global counts its own)
    after = metric(cluster, "protogalaxy_galaxy_rejected_total", reason="too_large")
    assert after == before + 2
    text = httpx.get(f"{glob}/metrics").text
    assert 'protogalaxy_global_rejected_total{reason="length_required"}' in text
    # The POST endpoints with limits of their own (transcripts: 64 MiB; an
    # aggregate or a reveal: the update limit) refuse 200 MB the same way,
    # with the service token (without it: 401, before the body is read).
    bearer = f"Authorization: Bearer {cluster.service_token}\r\n"
    statement = "X-PG-Statement: 00\r\nX-PG-Signature: 00\r\n"
    for target, extra, want in (
        (f"{glob}/v1/rounds/0/transcripts/0", "", (413, "too_large")),
        # the statement is checked before the body: it does not parse
        (f"{glob}/v1/rounds/0/aggregates/0", statement, (422, "malformed")),
    ):
        status, answer = raw_post(
            target, declared=200 << 20, sent=64 << 10, extra=extra
        )
        assert (status, answer["error"]) == (401, "bad_signature"), answer
        status, answer = raw_post(
            target, declared=200 << 20, sent=64 << 10, extra=extra + bearer
        )
        assert (status, answer["error"]) == want, answer


def test_the_openapi_documents_list_the_error_responses(cluster: LocalCluster) -> None:
    """Both services' OpenAPI documents list the refusals they really give, in
    the one error format."""
    for base, path, method in (
        (cluster.galaxy_url(0), "/v1/rounds/{rnd}/reveals/{client}", "put"),
        (cluster.galaxy_url(0), "/v1/commitments", "post"),
        (cluster.global_url, "/v1/rounds/{rnd}/leaves", "post"),
        (cluster.global_url, "/v1/status", "get"),
    ):
        doc = httpx.get(base + "/openapi.json").json()
        responses = doc["paths"][path][method]["responses"]
        for code in ("400", "401", "409", "411", "413", "422", "429", "503"):
            assert code in responses, (path, code)
        schema = responses["413"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorBody")

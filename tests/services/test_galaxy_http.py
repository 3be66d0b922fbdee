"""The galaxy service over real HTTP: a real redis-server, real uvicorn processes for
the global aggregator and a galaxy; the test plays the clients.

Bad input is answered 4xx with a reason, counted in /metrics, and leaves the stores
as they were; the service keeps serving and the round completes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from protogalaxy.codec import encode_update
from protogalaxy.config import load_config
from protogalaxy.crypto import SigningKey, VerifyKey, commit, verify_receipt
from protogalaxy.crypto.identity import sign_commitment
from protogalaxy.crypto.receipts import Receipt
from services.up import LocalCluster
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
    # Client 2 commits honestly to a NaN update; client 3 to a wrong-shape update.
    nan = update(2)
    nan["fc2.bias"] = torch.full((10,), math.nan)
    wrong_shape = {k: v for k, v in update(3).items()}
    wrong_shape["fc2.bias"] = torch.zeros(11)
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
    # Sent in pieces without a Content-Length: read as it streams, hashed as it lands.
    assert players.reveal(0, 0, chunked=True).status_code == 202
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
    refused(streamed_big, 413, "too_large")
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

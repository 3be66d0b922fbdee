"""Batch requests over real HTTP (a real redis-server, real uvicorn processes): a
runner playing many clients sends its clients' commitments, receipt requests and
acknowledgements in batches, and the global aggregator fetches a galaxy's updates
for its audit in batches.

A batch is only transport: every item is checked exactly as its single request
would be, and answered in order with its own result or refusal (logged and
counted); one bad item costs nothing to the others, and nothing lets an item in
that the single request would have refused.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protogalaxy.codec import encode_update
from protogalaxy.crypto import SigningKey, VerifyKey, commit, verify_receipt
from protogalaxy.crypto.identity import sign_commitment
from protogalaxy.crypto.receipts import Receipt
from protogalaxy.services.common import MAX_BATCH
from protogalaxy.services.global_app import _frames
from protogalaxy.services.up import LocalCluster
from tests.services.players import Players, played_cluster, update

pytestmark = pytest.mark.slow

CLIENTS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from played_cluster(Path(tmp_path_factory.mktemp("batches")), clients=CLIENTS)


@pytest.fixture(scope="module")
def players(cluster: LocalCluster) -> Players:
    p = Players(cluster, CLIENTS)
    p.register()
    return p


def url(c: LocalCluster, path: str) -> str:
    return c.galaxy_url(0) + path


def rejected(c: LocalCluster, reason: str, base: str | None = None) -> float:
    text = httpx.get((base or c.galaxy_url(0)) + "/metrics").text
    for line in text.splitlines():
        if "_rejected_total{" in line and f'reason="{reason}"' in line:
            return float(line.split()[-1])
    return 0.0


def item(players: Players, rnd: int, client: int, *, signer: int | None = None) -> Any:
    """Client ``client``'s signed commitment (by ``signer``'s key when given: a
    forgery); an honest one is kept for its reveal."""
    tensors = update(client)
    com, nonce = commit(tensors, client_id=client, galaxy_id=0, round=rnd)
    key = players.keys[client if signer is None else signer]
    if signer is None and rnd == 0:
        players.made[client] = (com, nonce, encode_update(tensors))
    return {
        "commitment": com.to_dict(),
        "signature": sign_commitment(key, com, run=players.run).hex(),
    }


def stranger(players: Players) -> Any:
    com, _ = commit(update(9), client_id=99, galaxy_id=0, round=0)
    key = SigningKey.generate()
    return {
        "commitment": com.to_dict(),
        "signature": sign_commitment(key, com, run=players.run).hex(),
    }


def committed(c: LocalCluster, rnd: int) -> set[int]:
    store = c.redis_client()
    keys = list(store.scan_iter(match=f"pg:galaxy:0:*:r:{rnd}:commitments"))
    assert len(keys) == 1, keys
    return {int(k) for k in store.hkeys(keys[0])}


def test_a_batch_of_commitments_checks_each_one(
    cluster: LocalCluster, players: Players
) -> None:
    players.wait_phase(0, "commit")
    batch_url = url(cluster, "/v1/commitments/batch")
    forged_before = rejected(cluster, "bad_signature")
    good0 = item(players, 0, 0)
    items = [
        good0,
        # client 1's commitment signed with client 2's key: a forgery
        item(players, 0, 1, signer=2),
        # an unregistered client
        stranger(players),
        "not an object",
        {"commitment": good0["commitment"]},  # no signature
        item(players, 5, 2),  # another round
        item(players, 0, 2),
        good0,  # a resend of an accepted one: idempotent
    ]
    log = cluster.out / "logs" / "galaxy-0.log"
    lines_before = log.read_text().count("batch_items_rejected")
    resp = httpx.post(batch_url, json={"items": items})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    got = [(r["ok"], r.get("status"), r.get("error")) for r in results]
    assert got[0] == (True, None, None)
    assert got[1] == (False, 401, "bad_signature")
    assert got[2] == (False, 404, "unknown_client")
    assert got[3] == (False, 422, "malformed")
    assert got[4] == (False, 422, "malformed")
    assert got[5] == (False, 409, "wrong_phase")
    assert got[6] == (True, None, None)
    assert got[7] == (True, None, None)
    assert [r.get("client_id") for r in results if r["ok"]] == [0, 2, 0]
    # Only the good ones were stored; the forgery was counted like a single one,
    # and the batch's refusals were logged in one line (not one per item).
    assert committed(cluster, 0) == {0, 2}
    assert rejected(cluster, "bad_signature") >= forged_before + 1
    assert log.read_text().count("batch_items_rejected") == lines_before + 1
    # Bounds: item count, body size, shape; refused whole, nothing stored.
    for body, status, reason in [
        ({"items": []}, 422, "malformed"),
        ({"items": [good0] * (MAX_BATCH + 1)}, 422, "malformed"),
        ({"things": [good0]}, 422, "malformed"),
        ([good0], 422, "malformed"),
    ]:
        resp = httpx.post(batch_url, json=body)
        assert (resp.status_code, resp.json()["error"]) == (status, reason)
    huge = {"items": [{"commitment": {"x": "y" * 4096}, "signature": ""}] * 200}
    resp = httpx.post(batch_url, json=huge)
    assert (resp.status_code, resp.json()["error"]) == (413, "too_large")
    assert committed(cluster, 0) == {0, 2}


def test_receipts_in_one_request(cluster: LocalCluster, players: Players) -> None:
    for c in (1, 3):  # 0 and 2 committed in the batch
        players.commit(0, c, update(c))
    players.wait_phase(0, "reveal")
    got = httpx.get(
        url(cluster, "/v1/rounds/0/receipts"), params={"clients": "3,0,77,1,2"}
    )
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    assert [r["ok"] for r in results] == [True, True, False, True, True]
    assert (results[2]["status"], results[2]["error"]) == (404, "unknown_client")
    global_key = VerifyKey.from_bytes(bytes.fromhex(cluster.global_public_key))
    for r in results:
        if r["ok"]:
            c = r["client_id"]
            verify_receipt(
                Receipt.from_dict(r["receipt"]),
                global_key=global_key,
                run=cluster.run_id,
                commitment=players.made[c][0],
                round=0,
            )
    for bad in ("", "1,x", "0,1,0", ",".join(map(str, range(MAX_BATCH + 1)))):
        resp = httpx.get(url(cluster, "/v1/rounds/0/receipts"), params={"clients": bad})
        assert (resp.status_code, resp.json()["error"]) == (422, "malformed"), bad


def test_acknowledgements_in_one_request(
    cluster: LocalCluster, players: Players
) -> None:
    # Three of the four reveals: the last one would close the round.
    acks = []
    for c in range(CLIENTS - 1):
        resp = players.reveal(0, c)
        assert resp.status_code == 202, resp.text
        acks.append(resp.json()["acknowledgement"])
    forged = copy.deepcopy(acks[1])
    forged["signature"] = "00" * 64
    other = copy.deepcopy(acks[2])
    other["statement"]["round"] = 7
    batch = [acks[0], forged, "x", other, acks[2], acks[0]]
    base = cluster.global_url
    before = rejected(cluster, "bad_signature", base)
    resp = httpx.post(f"{base}/v1/rounds/0/acks/batch", json={"items": batch})
    assert resp.status_code == 200, resp.text
    got = [(r["ok"], r.get("status"), r.get("error")) for r in resp.json()["results"]]
    assert got[0] == (True, None, None)
    assert got[1][:2] == (False, 401)
    assert got[2] == (False, 422, "malformed")
    assert got[3] == (False, 409, "wrong_round")
    assert got[4] == (True, None, None)
    assert got[5] == (True, None, None)  # a resend
    assert resp.json()["results"][5]["duplicate"] is True
    assert rejected(cluster, "bad_signature", base) >= before + 1
    assert players.reveal(0, CLIENTS - 1).status_code == 202


def test_the_audit_fetches_updates_in_batches(
    cluster: LocalCluster, players: Players
) -> None:
    """After the round, the galaxy serves its revealed updates by digest in one
    answer, to the auditor's token only; the global aggregator's audit of the
    round (which fetched them so) passed."""
    deadline = time.monotonic() + 60
    while httpx.get(cluster.global_url + "/v1/status").json()["round"] < 1:
        assert time.monotonic() < deadline, "round 0 did not complete"
        time.sleep(0.1)
    transcript = httpx.get(
        url(cluster, "/v1/audit/rounds/0/transcript"),
        headers={"authorization": f"Bearer {cluster.auditor_token}"},
    )
    assert transcript.status_code == 200, transcript.text
    entries = transcript.json()["transcript"]["body"]["clients"]
    digests = {e["client"]: e["reveal_digest"] for e in entries}
    ask = [digests[2], "ab" * 32, digests[0]]
    target = url(cluster, "/v1/audit/rounds/0/updates")
    resp = httpx.get(target, params={"digests": ",".join(ask)})
    assert resp.status_code == 401
    resp = httpx.get(
        target,
        params={"digests": ",".join(ask)},
        headers={"authorization": f"Bearer {cluster.auditor_token}"},
    )
    assert resp.status_code == 200, resp.text
    bodies = _frames(resp.content, resp.headers, len(ask), 1 << 20)
    assert bodies == [players.made[2][2], b"", players.made[0][2]]
    # The round's audit found nothing wrong with the galaxy.
    assert httpx.get(cluster.global_url + "/v1/status").json()["isolated"] == []


def test_a_malformed_batch_answer_is_no_answer() -> None:
    """What a lying galaxy answers to the audit's batch fetch cannot make the
    auditor over-read or take bytes for an update it did not frame."""
    one = b"\x05" + b"\x00" * 7 + b"hello"

    def frames(body: bytes, count: str, asked: int = 2) -> Any:
        return _frames(body, httpx.Headers({"x-pg-count": count}), asked, 10)

    assert frames(one, "1") == [b"hello"]
    assert frames(one + one, "2") == [b"hello", b"hello"]
    assert frames(one, "2") is None  # fewer frames than counted
    assert frames(one + b"x", "1") is None  # trailing bytes
    assert frames(one, "3") is None  # more than asked
    assert frames(one, "0") is None
    assert frames(one, "x") is None
    assert frames(b"\xff" * 8 + b"x", "1") is None  # a length past the limit
    assert frames(b"\x09" + b"\x00" * 7 + b"hello", "1") is None  # past the end
    # a whole, well-framed body larger than an update may be
    assert frames(b"\x0c" + b"\x00" * 7 + b"hello world!", "1") is None

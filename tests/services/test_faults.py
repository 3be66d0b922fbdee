"""Faults, on real processes: SIGKILL a galaxy mid-reveal, SIGKILL the global
aggregator mid-round, restart Redis, clients that never reveal.

With FedAvg and known updates the global model after each round is known exactly:
``w1 = w0 + lr * g0`` and, with server momentum ``beta``,
``w2 = w1 + lr * (beta * g0 + g1)``; comparing it with what the service serves shows
that every update answered 2xx was aggregated and that no round was applied twice.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from protogalaxy.codec import decode_update
from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.identity import VerifyKey, verify_commitment_signature
from protogalaxy.crypto.merkle import (
    InclusionProof,
    verify_consistency,
    verify_inclusion,
)
from protogalaxy.crypto.statements import SignedDocument
from protogalaxy.learning.models import build_model
from protogalaxy.services.redis_store import RedisGalaxyStore
from protogalaxy.services.up import LocalCluster
from tests.services.players import SPEC, Players, played_cluster, update

pytestmark = pytest.mark.slow

N = 4


def make_cluster(tmp_path: Path, **overrides: Any) -> Iterator[LocalCluster]:
    yield from played_cluster(tmp_path, clients=N, **overrides)


def served_model(cluster: LocalCluster) -> torch.Tensor:
    body = httpx.get(cluster.global_url + "/v1/model").content
    return SPEC.flatten(decode_update(body))


def initial_model() -> torch.Tensor:
    return SPEC.flatten(
        dict(build_model("mnist_cnn", seed=0).named_parameters())
    ).detach()


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return SPEC.flatten(tensors)


def play_round(p: Players, rnd: int, ups: dict[int, dict[str, torch.Tensor]]) -> None:
    p.wait_phase(rnd, "commit")
    for c, u in ups.items():
        p.commit(rnd, c, u)
    p.wait_phase(rnd, "reveal")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path)


def test_galaxy_killed_during_the_reveal_phase(cluster: LocalCluster) -> None:
    p = Players(cluster, N)
    p.register()
    ups = {c: update(c) for c in range(N)}
    play_round(p, 0, ups)
    assert p.reveal(0, 0).status_code == 202
    assert p.reveal(0, 1).status_code == 202
    cluster.kill("galaxy-0")  # SIGKILL: nothing flushed, nothing said goodbye
    cluster.procs["galaxy-0"].start()
    cluster.wait_ready(cluster.galaxy_url(0), "/readyz")
    assert p.reveal(0, 1).status_code == 202  # a resend after the restart is a no-op
    assert p.reveal(0, 2).status_code == 202
    assert p.reveal(0, 3).status_code == 202
    p.wait_global_round(1)
    g0 = torch.stack([flat(u) for u in ups.values()]).mean(0)
    expected = initial_model() + 1.3 * g0
    assert torch.allclose(served_model(cluster), expected, atol=1e-5)


def test_galaxy_killed_while_aggregating(cluster: LocalCluster) -> None:
    """SIGKILL after the close claimed the round (state ``aggregating``, nothing
    of the close stored yet): the restarted galaxy aggregates the round from the
    stored reveals, each answered 202 once, and the global applies it."""
    p = Players(cluster, N)
    p.register()
    ups = {c: update(c) for c in range(N)}
    play_round(p, 0, ups)
    for c in range(3):  # client 3 never reveals: the close waits for its deadline
        assert p.reveal(0, c).status_code == 202
    cluster.kill("galaxy-0")
    store = galaxy_store(cluster)
    # What the killed close left: the claim (its note of when may be lost too).
    assert store.compare_and_set_state((0, "reveal"), (0, "aggregating"))
    cluster.procs["galaxy-0"].start()
    cluster.wait_ready(cluster.galaxy_url(0), "/readyz")
    assert p.reveal(0, 3).status_code == 409  # the round is closed to reveals
    p.wait_global_round(1, timeout=60)
    g0 = torch.stack([flat(ups[c]) for c in range(3)]).mean(0)
    assert torch.allclose(served_model(cluster), initial_model() + 1.3 * g0, atol=1e-5)
    transcript = httpx.get(
        f"{cluster.galaxy_url(0)}/v1/audit/rounds/0/transcript",
        headers={"authorization": f"Bearer {cluster.auditor_token}"},
    )
    assert transcript.status_code == 200
    fates = [e["fate"] for e in transcript.json()["transcript"]["body"]["clients"]]
    assert fates == ["aggregated"] * 3 + ["withheld"]


def test_redis_killed_right_after_a_202(cluster: LocalCluster) -> None:
    """SIGKILL Redis the moment a reveal is answered 202: the append-only file
    is written (not yet fsynced: the page cache outlives the process) before
    Redis replies, so the restarted Redis has the reveal, and the round
    aggregates every update answered 2xx, once."""
    p = Players(cluster, N)
    p.register()
    ups = {c: update(c) for c in range(N)}
    play_round(p, 0, ups)
    for c in range(N - 1):
        assert p.reveal(0, c).status_code == 202
    cluster.kill("redis")
    cluster.procs["redis"].start()
    cluster.wait_ready(cluster.galaxy_url(0), "/readyz")
    assert sorted(galaxy_store(cluster).reveals(0)) == [0, 1, 2]
    assert p.reveal(0, N - 1).status_code == 202
    p.wait_global_round(1, timeout=60)
    g0 = torch.stack([flat(u) for u in ups.values()]).mean(0)
    assert torch.allclose(served_model(cluster), initial_model() + 1.3 * g0, atol=1e-5)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc), reaping none."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def test_global_killed_mid_round_resumes_without_applying_twice(
    cluster: LocalCluster,
) -> None:
    p = Players(cluster, N)
    p.register()
    ups0 = {c: update(c) for c in range(N)}
    play_round(p, 0, ups0)
    for c in range(N):
        assert p.reveal(0, c).status_code == 202
    p.wait_global_round(1)
    ups1 = {c: update(10 + c) for c in range(N)}
    play_round(p, 1, ups1)  # the round-1 head is signed: the galaxy is revealing
    evaluators = children(cluster.procs["global"].popen.pid)
    assert evaluators, "the global aggregator evaluates in a child process"
    head = httpx.get(f"{cluster.global_url}/v1/rounds/1/head", params={"galaxy": 0})
    assert head.status_code == 200
    log_before = checked_audit_log(cluster)
    cluster.kill("global")
    # The kernel takes the evaluator down with its SIGKILLed parent (no orphans).
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in evaluators):
        assert time.monotonic() < deadline, "the evaluator outlived its parent"
        time.sleep(0.1)
    cluster.procs["global"].start()
    cluster.wait_ready(cluster.global_url, "/readyz")
    # The head it signed before it was killed, not a second one: the receipts
    # clients hold stay good.
    again = httpx.get(f"{cluster.global_url}/v1/rounds/1/head", params={"galaxy": 0})
    assert again.json() == head.json()
    for c in range(N):
        assert p.reveal(1, c).status_code == 202
    status = p.wait_global_round(2)
    assert status["finished"] and status["audit_log"]["size"] == 2
    # The history resumed with the checkpoint: each round once, each evaluated.
    deadline = time.monotonic() + 60
    while status["evaluating"]:
        assert time.monotonic() < deadline, "evaluations did not finish"
        time.sleep(0.1)
        status = cluster.status()
    assert [h["round"] for h in status["history"]] == [0, 1]
    # The log after the restart extends the log before it (RFC 9162).
    assert checked_audit_log(cluster, since=log_before)["size"] == 2
    assert all(isinstance(h["accuracy"], float) for h in status["history"])
    g0 = torch.stack([flat(u) for u in ups0.values()]).mean(0)
    g1 = torch.stack([flat(u) for u in ups1.values()]).mean(0)
    w1 = initial_model() + 1.3 * g0
    expected = w1 + 1.3 * (0.5 * g0 + g1)  # server momentum survived the restart
    assert torch.allclose(served_model(cluster), expected, atol=1e-5)


def checked_audit_log(
    cluster: LocalCluster, since: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The global aggregator's audit log as anyone reads it: its signed head,
    every entry (signed round records) with its inclusion proof, and, from an
    earlier head ``since``, the consistency proof; each checked with the
    library's verifiers. The head's body."""
    url = cluster.global_url
    key = VerifyKey.from_bytes(bytes.fromhex(cluster.global_public_key))
    signed = SignedDocument.from_dict(httpx.get(f"{url}/v1/audit-log").json())
    assert signed.kind == "log-head"
    signed.verify(key, run=cluster.run_id)
    head = signed.body
    size, root = head["size"], bytes.fromhex(head["root"])
    entries = httpx.get(f"{url}/v1/audit-log/entries").json()["entries"]
    assert len(entries) == size
    for i, raw in enumerate(entries):
        record = SignedDocument.from_dict(raw, kind="round-record")
        record.verify(key, run=cluster.run_id)
        got = httpx.get(f"{url}/v1/audit-log/inclusion/{i}", params={"size": size})
        proof = got.json()
        verify_inclusion(
            record.to_bytes(),
            InclusionProof(i, size, [bytes.fromhex(h) for h in proof["path"]]),
            root,
        )
    if since is not None and since["size"]:
        got = httpx.get(
            f"{url}/v1/audit-log/consistency",
            params={"first": since["size"], "second": size},
        ).json()
        verify_consistency(
            since["size"],
            size,
            bytes.fromhex(since["root"]),
            root,
            [bytes.fromhex(h) for h in got["proof"]],
        )
    return dict(head)


def test_global_killed_while_waiting_for_roots(cluster: LocalCluster) -> None:
    """SIGKILL the global aggregator in its leaves phase (round 1 open, no head
    signed yet): it resumes from round 1's checkpoint, signs the round's one
    head once the roots come again, and the log extends the one before."""
    p = Players(cluster, N)
    p.register()
    ups0 = {c: update(c) for c in range(N)}
    play_round(p, 0, ups0)
    for c in range(N):
        assert p.reveal(0, c).status_code == 202
    status = p.wait_global_round(1)
    assert status["phase"] == "leaves"
    log_before = checked_audit_log(cluster)
    cluster.kill("global")
    cluster.procs["global"].start()
    cluster.wait_ready(cluster.global_url, "/readyz")
    ups1 = {c: update(10 + c) for c in range(N)}
    play_round(p, 1, ups1)
    for c in range(N):
        assert p.reveal(1, c).status_code == 202
    p.wait_global_round(2)
    g0 = torch.stack([flat(u) for u in ups0.values()]).mean(0)
    g1 = torch.stack([flat(u) for u in ups1.values()]).mean(0)
    w1 = initial_model() + 1.3 * g0
    expected = w1 + 1.3 * (0.5 * g0 + g1)
    assert torch.allclose(served_model(cluster), expected, atol=1e-5)
    assert checked_audit_log(cluster, since=log_before)["size"] == 2


def galaxy_store(cluster: LocalCluster) -> RedisGalaxyStore:
    """Galaxy 0's store of this run, read directly from Redis."""
    return RedisGalaxyStore.from_url(
        cluster.redis_url, galaxy=0, prefix=f"pg:galaxy:0:{cluster.run_id}:"
    )


def test_clients_that_never_reveal(tmp_path: Path) -> None:
    """The round closes at the reveal deadline without them, and withholding costs:
    a behaviour score of zero for each round, on record with the signed
    commitment."""
    for cluster in make_cluster(
        tmp_path, reveal_deadline_s=3, **{"defense.layers": [1, 4]}
    ):
        p = Players(cluster, N)
        p.register()
        ups = {c: update(c) for c in range(N)}
        play_round(p, 0, ups)
        assert p.reveal(0, 0).status_code == 202
        assert p.reveal(0, 2).status_code == 202  # 1 and 3 never reveal
        p.wait_global_round(1, timeout=60)
        g0 = (flat(ups[0]) + flat(ups[2])) / 2
        assert torch.allclose(
            served_model(cluster), initial_model() + 1.3 * g0, atol=1e-5
        )
        play_round(p, 1, {c: update(10 + c) for c in range(N)})
        for c in (0, 2, 3):  # client 1 withholds a second time
            assert p.reveal(1, c).status_code == 202
        p.wait_global_round(2, timeout=60)
        state = httpx.get(cluster.galaxy_url(0) + "/v1/clients/1").json()
        assert state["reputation"] == pytest.approx(0.32)  # 0.5 * 0.8 * 0.8
        assert state["clean_rounds"] == 0 and state["last_round"] == 1
        honest = httpx.get(cluster.galaxy_url(0) + "/v1/clients/0").json()
        assert honest["reputation"] > 0.5
        records = httpx.get(cluster.galaxy_url(0) + "/v1/clients/1/evidence").json()
        withheld = [e for e in records if e["event"] == "reveal_withheld"]
        assert [e["round"] for e in withheld] == [0, 1]
        for e in withheld:
            com = Commitment.from_bytes(bytes.fromhex(e["evidence"]["leaf"]))
            verify_commitment_signature(
                p.keys[1].public_key,
                com,
                bytes.fromhex(e["evidence"]["commitment_signature"]),
                run=cluster.run_id,
            )


def test_redis_restart_keeps_reputations_quarantine_and_evidence(
    tmp_path: Path,
) -> None:
    for cluster in make_cluster(
        tmp_path,
        **{"defense.layers": [1, 4], "defense.reputation.quarantine_below": 0.47},
    ):
        p = Players(cluster, N)
        p.register()
        ups = {c: update(c) for c in range(N)}
        play_round(p, 0, ups)
        for c in range(3):
            assert p.reveal(0, c).status_code == 202
        # client 3 reveals something else than it committed to: quarantined (R = 0.45)
        bad = p.reveal(0, 3, body=p.made[0][2])
        assert bad.status_code == 422
        p.wait_global_round(1)
        before = galaxy_store(cluster)
        reputation, evidence = before.load_reputation(), before.evidence()
        # the rejection, then the quarantine it caused, each on record
        assert [(e["event"], e["client"]) for e in evidence] == [
            ("reveal_rejected", 3),
            ("client_quarantined", 3),
        ]
        assert evidence[1]["evidence"]["leaf"] and evidence[1]["signature"]
        # The accepted bodies were streamed into stages and renamed into place.
        bodies = before.reveals(0)
        assert sorted(bodies) == [0, 1, 2]
        redis_proc = cluster.procs["redis"]
        redis_proc.stop()
        # Redis down: the galaxy answers 503 with the reason, and keeps running.
        down = httpx.get(cluster.galaxy_url(0) + "/readyz")
        assert down.status_code == 503
        assert down.json()["error"] == "store_unavailable"
        redis_proc.start()  # the same data directory (AOF on)
        cluster.wait_ready(cluster.galaxy_url(0), "/readyz")
        after = galaxy_store(cluster)
        assert after.load_reputation() == reputation
        assert after.evidence() == evidence
        assert after.reveals(0) == bodies
        cluster.restart("galaxy-0")  # and the galaxy reads them back from Redis
        cluster.wait_ready(cluster.galaxy_url(0), "/readyz")
        state = httpx.get(cluster.galaxy_url(0) + "/v1/clients/3").json()
        assert state["status"] == "quarantined" and state[
            "reputation"
        ] == pytest.approx(0.4)  # 0.5 * 0.8: one round with B = 0


def refused(proc: Any) -> str:
    """Start ``proc``; it must exit with an error. Its log so far."""
    proc.start()
    assert proc.popen is not None
    assert proc.popen.wait(timeout=120) != 0
    return str(proc.log.read_text())


def test_lost_checkpoints_fail_loudly(tmp_path: Path) -> None:
    """A newest checkpoint that does not verify, or none that does: the global
    aggregator refuses to start (it would rewrite history: an applied round
    recorded as skipped, or round 0 again, signed with the same key). Told to go
    on (``PG_ACCEPT_CHECKPOINT_LOSS=1``, logged) it starts past every round it
    ever signed a head for, so no round gets a second head, and the model it
    serves has a version number never served before."""
    for cluster in make_cluster(tmp_path, **{"training.rounds": 4}):
        p = Players(cluster, N)
        p.register()
        for rnd in range(2):
            play_round(p, rnd, {c: update(10 * rnd + c) for c in range(N)})
            for c in range(N):
                assert p.reveal(rnd, c).status_code == 202
            p.wait_global_round(rnd + 1)
        proc = cluster.procs["global"]
        proc.stop()
        ckpts = sorted((cluster.out / "global" / "checkpoints").glob("ckpt-*"))
        assert [c.name for c in ckpts][-1] == "ckpt-00000002.pgck"

        data = bytearray(ckpts[-1].read_bytes())
        data[-1] ^= 0xFF
        ckpts[-1].write_bytes(bytes(data))
        assert "refusing to start over lost history" in refused(proc)
        for ckpt in ckpts:
            ckpt.write_bytes(b"not a checkpoint")
        log = refused(proc)
        assert log.count("refusing to start over lost history") == 2
        proc.env["PG_ACCEPT_CHECKPOINT_LOSS"] = "1"
        proc.start()
        cluster.wait_ready(cluster.global_url, "/readyz")
        status = cluster.status()
        # Rounds 0 and 1 were signed: it goes on at round 2, with both on
        # record as lost, and says so in its log.
        assert status["round"] == 2 and status["phase"] == "leaves"
        assert [h.get("lost") for h in status["history"]] == [True, True]
        assert '"event": "checkpoint_loss"' in proc.log.read_text()
        model = httpx.get(cluster.global_url + "/v1/model")
        assert model.headers["x-pg-model-version"] == "2"
        assert torch.equal(served_model(cluster), initial_model())
        # The galaxy had version 2 cached with other bytes: it fetches again.
        deadline = time.monotonic() + 60
        while httpx.get(cluster.galaxy_url(0) + "/v1/model").content != model.content:
            assert time.monotonic() < deadline, "the galaxy kept its stale model"
            time.sleep(0.2)


class Via(Players):
    """The same players, talking to another replica of galaxy 0."""

    def __init__(self, players: Players, base: str) -> None:
        self.__dict__.update(players.__dict__)  # keys and commitments shared
        self.base = base

    def url(self, path: str) -> str:
        return self.base + path


def play_on_replicas(tmp_path: Path, *, kill: bool) -> tuple[bytes, Any, Any]:
    """Three rounds on two replicas of galaxy 0 (one Redis), clients on both. In
    round 0 client 3 reveals another update than it committed to. With
    ``kill``, replica B is stopped (SIGSTOP) after round 0 and round 1 runs on
    replica A alone; then B goes on (SIGCONT) holding in memory what it knew
    after round 0, A is stopped, and round 2 runs on B alone, which must close
    it from round 1's state. (The audit is off here: it fetches updates from
    one URL per galaxy, A's; in Kubernetes that is the Service, which picks a
    live replica.) The served model's bytes, the stored reputations and the
    evidence."""
    for cluster in make_cluster(
        tmp_path,
        **{
            "training.rounds": 3,
            "defense.layers": [1, 4],
            "defense.reputation.quarantine_below": 0.47,
            "audit.enabled": False,
        },
    ):
        a = Players(cluster, N)
        proc_a = cluster.procs["galaxy-0"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = cluster.out / "logs" / "galaxy-0b.log"
        proc_b = type(proc_a)(
            "galaxy-0b", proc_a.argv, dict(proc_a.env, PG_PORT=str(port)), log
        )
        proc_b.start()
        try:
            b = Via(a, f"http://127.0.0.1:{port}")
            cluster.wait_ready(b.base, "/readyz")
            a.register()
            for rnd in range(3):
                sides = {0: a, 1: b, 2: a, 3: b}
                if kill and rnd:
                    sides = dict.fromkeys(range(N), a if rnd == 1 else b)
                ups = {c: update(100 * rnd + c) for c in range(N)}
                sides[0].wait_phase(rnd, "commit")
                for c in range(N):
                    sides[c].commit(rnd, c, ups[c])
                sides[0].wait_phase(rnd, "reveal")
                for c in range(N):
                    if rnd == 0 and c == 3:
                        bad = sides[c].reveal(rnd, c, body=a.made[0][2])
                        assert bad.status_code == 422
                    else:
                        assert sides[c].reveal(rnd, c).status_code == 202
                sides[0].wait_global_round(rnd + 1, timeout=60)
                if kill and rnd == 0:
                    proc_b.send(signal.SIGSTOP)
                if kill and rnd == 1:
                    proc_b.send(signal.SIGCONT)
                    proc_a.send(signal.SIGSTOP)
                if kill and rnd == 2:
                    proc_a.send(signal.SIGCONT)
            for base in (cluster.galaxy_url(0), b.base):
                state = httpx.get(base + "/v1/clients/3").json()
                assert state["status"] == "quarantined"
            store = galaxy_store(cluster)
            body = httpx.get(cluster.global_url + "/v1/model").content
            history = cluster.status()["history"]
            assert [h["applied"] for h in history] == [True] * 3
            assert all(not h["misbehaved"] for h in history)
            return body, store.load_reputation(), store.evidence()
        finally:
            proc_b.stop()
    raise AssertionError("no cluster")


def test_two_galaxy_replicas_one_stopped_and_restarted(tmp_path: Path) -> None:
    """Reputations live in Redis only: with a replica stopped mid-run that goes
    on with what it held, the model bytes, the reputations and the evidence are
    those of the same run without the fault; the quarantine is never rolled
    back by a stale replica, and each record is on file once."""
    model, reputation, evidence = play_on_replicas(tmp_path / "faulty", kill=True)
    want = play_on_replicas(tmp_path / "clean", kill=False)
    assert model == want[0]
    # The same records (their evidence holds each run's own commitments).
    assert reputation["clients"] == want[1]["clients"]
    assert saved_rounds(reputation) == {c: 3 for c in range(N)}

    def events(records: Any) -> list[tuple[str, int, int]]:
        return [(e["event"], e["client"], e["round"]) for e in records]

    assert events(evidence) == events(want[2])
    assert events(evidence).count(("reveal_rejected", 3, 0)) == 1
    assert events(evidence).count(("client_quarantined", 3, 0)) == 1


def saved_rounds(reputation: Any) -> dict[int, int]:
    return {int(c): r["rounds"] for c, r in reputation["clients"].items()}

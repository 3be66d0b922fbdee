"""The galaxy and global round state machines, over the in-memory stores."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable

import pytest
import torch

from protogalaxy.codec import encode_update
from protogalaxy.crypto import (
    SigningKey,
    commit,
    verify_consistency,
    verify_inclusion,
    verify_receipt,
)
from protogalaxy.crypto.identity import (
    sign_commitment,
    sign_registration,
    sign_reveal,
    verify_reveal_signature,
)
from protogalaxy.crypto.keyring import client_key, parse_keyring, provision
from protogalaxy.crypto.statements import (
    AggregateStatement,
    aggregate_digest,
    sign_statement,
)
from protogalaxy.defense.pipeline import DefenseConfig, GalaxyDefense, GlobalDefense
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.galaxy import (
    ClientRoster,
    GalaxyAggregator,
    Rejected,
    UnknownClient,
    WrongPhase,
)
from protogalaxy.protocol.global_aggregator import GlobalAggregator
from protogalaxy.protocol.stores import GalaxyStore, MemoryGalaxyStore, PhaseClosed
from protogalaxy.spec import UpdateSpec

SPEC = UpdateSpec(("b", "w"), ((3,), (2, 4)))
D = SPEC.numel
RUN = "test-run"


STORE_FACTORY: Callable[[], GalaxyStore] = MemoryGalaxyStore


@pytest.fixture(params=["memory", "redis"], autouse=True)
def galaxy_store(request: pytest.FixtureRequest) -> None:
    """Every protocol test runs over both stores (World picks up the choice)."""
    global STORE_FACTORY
    if request.param == "memory":
        STORE_FACTORY = MemoryGalaxyStore
    else:
        from protogalaxy.services.redis_store import RedisGalaxyStore

        url = request.getfixturevalue("redis_url")
        worlds = itertools.count()  # each World of a test has a prefix of its own
        STORE_FACTORY = lambda: RedisGalaxyStore.from_url(  # noqa: E731
            url, galaxy=0, prefix=f"pg:galaxy:0:{next(worlds)}:"
        )


class World:
    """One galaxy (id 0) with `n` clients and a global aggregator."""

    def __init__(
        self,
        n: int = 6,
        layers: tuple[int, ...] = (1, 2, 3, 4, 5),
        agg: str = "multikrum",
        files: dict[str, bytes] | None = None,
    ):
        files = files or provision(galaxies=1, clients=n)
        self.n, self.files = n, files
        self.global_key = SigningKey.from_bytes(files["global.key"])
        self.galaxy_key = SigningKey.from_bytes(files["galaxy-0.key"])
        self.keys = {c: client_key(files["clients.seed"], c) for c in range(n)}
        self.cfg = DefenseConfig(
            layers=frozenset(layers), aggregator=agg, byzantine_fraction=0.2
        )
        self.store = STORE_FACTORY()
        self.galaxy = self.replica()
        for c, k in self.keys.items():
            self.galaxy.register(
                c,
                k.public_key.to_bytes(),
                sign_registration(k, client_id=c, galaxy_id=0, run=RUN),
            )
        self.glob = GlobalAggregator(
            key=self.global_key,
            galaxy_keys=parse_keyring(files["galaxies.pub"].decode()),
            assignment=Assignment(n, 1),
            run=RUN,
            params=torch.zeros(D),
            defense=GlobalDefense(self.cfg),
        )
        self.secrets: dict[int, tuple[bytes, bytes, object]] = {}
        self.replayable = files is not None

    def replica(self) -> GalaxyAggregator:
        """Another aggregator of galaxy 0 on the same store: a second replica, or
        the galaxy's process after a restart (it keeps nothing but the store)."""
        return GalaxyAggregator(
            0,
            store=self.store,
            spec=SPEC,
            defense=GalaxyDefense(0, self.cfg),
            key=self.galaxy_key,
            global_key=self.global_key.public_key,
            roster=ClientRoster(
                0,
                self.n,
                lambda c: 0,
                parse_keyring(self.files["clients.pub"].decode()),
            ),
            run=RUN,
            max_update_bytes=4096,
        )

    def commit_all(self, rnd: int, updates: dict[int, torch.Tensor]) -> None:
        self.galaxy.open_round(rnd)
        for c, vec in updates.items():
            tensors = SPEC.unflatten(vec)
            fixed = {}
            if self.replayable:  # the same commitments in every World
                fixed = {"nonce": bytes([c, rnd]) * 16, "timestamp_ms": 1000 + rnd}
            com, nonce = commit(tensors, client_id=c, galaxy_id=0, round=rnd, **fixed)
            self.galaxy.submit_commitment(
                com, sign_commitment(self.keys[c], com, run=RUN)
            )
            self.secrets[c] = (encode_update(tensors), nonce, com)

    def publish_head(self, rnd: int) -> None:
        leaf = self.galaxy.close_commit(rnd, force=True)
        assert leaf is not None
        self.glob.submit_leaf(leaf)
        head = self.glob.close_leaves(rnd)
        self.galaxy.accept_head(rnd, head, self.glob.proof_for(0))

    def reveal(self, rnd: int, c: int, body: bytes, nonce: bytes) -> None:
        com = self.secrets[c][2]
        sig = sign_reveal(self.keys[c], com, body, nonce, run=RUN)  # type: ignore[arg-type]
        self.galaxy.submit_reveal(rnd, c, body, nonce, sig)

    def reveal_all(self, rnd: int) -> None:
        for c, (body, nonce, _) in self.secrets.items():
            self.reveal(rnd, c, body, nonce)


def honest(n: int, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=g)
    return {c: base + 0.1 * torch.randn(D, generator=g) for c in range(n)}


def test_a_full_round_with_receipts_and_audit_log() -> None:
    w = World(6, layers=(1,), agg="fedavg")
    ups = honest(6)
    w.commit_all(0, ups)
    w.publish_head(0)
    for c, (_, _, com) in w.secrets.items():
        receipt = w.galaxy.receipt(0, c)
        verify_receipt(
            receipt,
            global_key=w.global_key.public_key,
            run=RUN,
            commitment=com,
            round=0,
        )
    w.reveal_all(0)
    result = w.galaxy.close_reveal(0, force=True)
    assert result.aggregate is not None and result.weight == 6
    assert torch.allclose(
        result.aggregate, torch.stack(list(ups.values())).mean(0), atol=1e-6
    )
    assert result.statement is not None and result.statement.statement.weight == 6
    assert w.glob.submit_aggregate(result.statement, result.aggregate)
    out = w.glob.finish_round(0)
    assert out.applied and torch.allclose(w.glob.params, result.aggregate)
    assert w.glob.round == 1 and w.glob.audit_log.size == 1
    # Round 2 extends the log consistently.
    w.secrets.clear()
    w.commit_all(1, honest(6, seed=1))
    w.publish_head(1)
    w.reveal_all(1)
    r1 = w.galaxy.close_reveal(1, force=True)
    w.glob.submit_aggregate(r1.statement, r1.aggregate)
    w.glob.finish_round(1)
    log = w.glob.audit_log
    verify_consistency(1, 2, log.head(1).root, log.root, log.consistency_proof(1))


def test_commitment_checks() -> None:
    w = World(4)
    w.galaxy.open_round(3)
    com, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=1, galaxy_id=0, round=3)
    with pytest.raises(Rejected, match="bad_signature"):
        w.galaxy.submit_commitment(
            com, sign_commitment(w.keys[2], com, run=RUN)
        )  # another's key
    stranger = SigningKey.generate()
    c9, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=9, galaxy_id=0, round=3)
    with pytest.raises(UnknownClient):
        w.galaxy.submit_commitment(c9, sign_commitment(stranger, c9, run=RUN))
    old, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=1, galaxy_id=0, round=2)
    with pytest.raises(WrongPhase):  # an old commitment replayed in a later round
        w.galaxy.submit_commitment(old, sign_commitment(w.keys[1], old, run=RUN))
    other_galaxy, _ = commit(
        SPEC.unflatten(torch.zeros(D)), client_id=1, galaxy_id=5, round=3
    )
    with pytest.raises(Rejected, match="wrong_round"):
        w.galaxy.submit_commitment(
            other_galaxy, sign_commitment(w.keys[1], other_galaxy, run=RUN)
        )
    w.galaxy.submit_commitment(com, sign_commitment(w.keys[1], com, run=RUN))
    w.galaxy.submit_commitment(
        com, sign_commitment(w.keys[1], com, run=RUN)
    )  # identical: no-op
    second, _ = commit(SPEC.unflatten(torch.ones(D)), client_id=1, galaxy_id=0, round=3)
    with pytest.raises(Rejected, match="duplicate"):
        w.galaxy.submit_commitment(second, sign_commitment(w.keys[1], second, run=RUN))
    assert list(w.store.commitments(3)) == [1]
    assert w.store.commitments(3)[1][0] == com.to_bytes()


def test_reveal_checks_leave_accepted_updates_intact() -> None:
    w = World(6)
    ups = honest(6)
    w.commit_all(0, ups)
    with pytest.raises(WrongPhase):  # no head yet
        w.reveal(0, 0, w.secrets[0][0], w.secrets[0][1])
    w.publish_head(0)
    good_body, good_nonce, _ = w.secrets[0]
    w.reveal(0, 0, good_body, good_nonce)
    w.reveal(0, 0, good_body, good_nonce)  # resent: a no-op
    before = w.store.reveals(0)
    cases = {
        1: (
            encode_update(SPEC.unflatten(ups[1] + 1)),
            w.secrets[1][1],
            "commitment_mismatch",
        ),
        2: (w.secrets[2][0], bytes(32), "commitment_mismatch"),
        5: (b"x" * 5000, w.secrets[5][1], "too_large"),
    }
    for c, (body, nonce, reason) in cases.items():
        with pytest.raises(Rejected, match=reason):
            w.reveal(0, c, body, nonce)
    with pytest.raises(UnknownClient):
        w.galaxy.submit_reveal(0, 42, good_body, good_nonce, bytes(64))
    with pytest.raises(Rejected, match="duplicate"):
        w.reveal(0, 0, w.secrets[3][0], w.secrets[3][1])
    # A forged reveal for client 3 (signed by another key) is refused and, being
    # unattributable, is not held against client 3.
    forged = sign_reveal(w.keys[4], w.secrets[3][2], b"garbage", bytes(32), run=RUN)  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="bad_signature"):
        w.galaxy.submit_reveal(0, 3, b"garbage", bytes(32), forged)
    w.reveal(0, 3, w.secrets[3][0], w.secrets[3][1])
    assert {c: w.store.reveals(0)[c] for c in before} == before
    records = w.galaxy.rejection_records(0)
    assert {c: r["reason"] for c, r in records.items()} == {
        1: "commitment_mismatch",
        2: "commitment_mismatch",
    }
    # Each with the client's own signed reveal, so an auditor can check it.
    for c, r in records.items():
        com = w.secrets[c][2]
        verify_reveal_signature(
            w.keys[c].public_key,
            com,  # type: ignore[arg-type]
            bytes.fromhex(r["nonce"]),
            bytes.fromhex(r["signature"]),
            digest=bytes.fromhex(r["digest"]),
            run=RUN,
        )


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        (
            {"b": torch.tensor([1.0, math.nan, 0.0]), "w": torch.zeros(2, 4)},
            "non_finite",
        ),
        (
            {"b": torch.tensor([1.0, math.inf, 0.0]), "w": torch.zeros(2, 4)},
            "non_finite",
        ),
        ({"b": torch.zeros(4), "w": torch.zeros(2, 4)}, "shape"),
        ({"b": torch.zeros(3, dtype=torch.float64), "w": torch.zeros(2, 4)}, "dtype"),
        ({"w": torch.zeros(2, 4)}, "shape"),
    ],
)
def test_bad_updates_that_match_their_commitment(
    tensors: dict[str, torch.Tensor], reason: str
) -> None:
    # The client commits honestly to a malformed update: the commitment matches, the
    # update itself is refused by layer 1.
    w = World(4)
    w.galaxy.open_round(0)
    com, nonce = commit(tensors, client_id=0, galaxy_id=0, round=0)
    w.galaxy.submit_commitment(com, sign_commitment(w.keys[0], com, run=RUN))
    w.publish_head(0)
    w.secrets[0] = (encode_update(tensors), nonce, com)
    with pytest.raises(Rejected, match=reason):
        w.reveal(0, 0, encode_update(tensors), nonce)
    assert w.galaxy.rejection_records(0)[0]["reason"] == reason
    # The body matches the commitment: it is kept for an auditor to check.
    assert w.galaxy.audit_update(0, 0) == encode_update(tensors)


def test_a_round_is_aggregated_once_and_mismatch_costs_reputation() -> None:
    w = World(6)
    w.commit_all(0, honest(6))
    w.publish_head(0)
    _, nonce, com = w.secrets[4]
    w.secrets[4] = (encode_update(SPEC.unflatten(torch.ones(D))), nonce, com)
    with pytest.raises(Rejected, match="commitment_mismatch"):
        w.reveal_all(0)
    w.reveal(0, 5, w.secrets[5][0], w.secrets[5][1])
    result = w.galaxy.close_reveal(0, force=True)
    with pytest.raises(WrongPhase):
        w.galaxy.close_reveal(0, force=True)
    out = result.report.outcomes[4]
    assert not out.integrity and out.reasons == ["integrity:commitment_mismatch"]
    tracker = w.galaxy.defense.tracker
    assert tracker.reputation(4) < 0.5 < tracker.reputation(0)


def test_evidence_of_a_quarantine_verifies() -> None:
    w = World(10)
    rnd = 0
    while not w.store.evidence():
        ups = honest(10, seed=rnd)
        ups[9] = -20 * ups[9]  # a persistent attacker
        w.secrets.clear()
        w.commit_all(rnd, ups)
        w.publish_head(rnd)
        w.reveal_all(rnd)
        result = w.galaxy.close_reveal(rnd, force=True, reference_direction=ups[0])
        w.glob.submit_aggregate(result.statement, result.aggregate)
        w.glob.finish_round(rnd)
        rnd += 1
        assert rnd < 20
    record = w.store.evidence()[0]
    assert record["event"] == "client_quarantined" and record["client"] == 9
    ev = record["evidence"]
    from protogalaxy.crypto.merkle import InclusionProof

    verify_inclusion(
        bytes.fromhex(ev["leaf"]),
        InclusionProof.from_dict(ev["inclusion_proof"]),
        bytes.fromhex(ev["galaxy_root"]),
    )
    assert ev["round"] == record["round"] and "norm_z" in ev["metrics"]
    assert any(r.startswith("statistics:") for r in record["reasons"])
    assert all(w.galaxy.defense.tracker.status(c) == "active" for c in range(9))


def restated(w: World, r: object, aggregate: torch.Tensor, **fields: object) -> object:
    """The galaxy's aggregate statement of ``r`` for ``aggregate`` (its digest), with
    ``fields`` changed, signed with the galaxy's own key: a compromised galaxy."""
    st = r.statement.statement  # type: ignore[attr-defined]
    values = aggregate.contiguous().numpy().tobytes()
    new = AggregateStatement(
        **{
            "round": st.round,
            "galaxy_id": st.galaxy_id,
            "tree_size": st.tree_size,
            "root": st.root,
            "weight": st.weight,
            "digest": aggregate_digest(values),
            "transcript": st.transcript,
            **fields,
        }
    )
    return sign_statement(w.galaxy_key, new, run=RUN)


def test_global_aggregate_binding_and_tampering() -> None:
    w = World(4, layers=(1,), agg="fedavg")
    w.commit_all(0, honest(4))
    w.publish_head(0)
    w.reveal_all(0)
    r = w.galaxy.close_reveal(0, force=True)
    assert r.statement is not None and r.aggregate is not None
    with pytest.raises(Rejected, match="another root"):
        w.glob.submit_aggregate(
            restated(w, r, r.aggregate, root=bytes(32)), r.aggregate
        )
    with pytest.raises(Rejected, match="another root"):
        w.glob.submit_aggregate(restated(w, r, r.aggregate, tree_size=5), r.aggregate)
    # The statement's digest binds the values: other values under it are refused.
    with pytest.raises(Rejected, match="digest"):
        w.glob.submit_aggregate(r.statement, r.aggregate + 1)
    # Signed with another key than galaxy 0's: not galaxy 0's word.
    impostor = sign_statement(SigningKey.generate(), r.statement.statement, run=RUN)
    with pytest.raises(Rejected, match="bad_signature"):
        w.glob.submit_aggregate(impostor, r.aggregate)
    # Galaxy 0's own signature, but made for another run.
    other_run = sign_statement(w.galaxy_key, r.statement.statement, run="other")
    with pytest.raises(Rejected, match="bad_signature"):
        w.glob.submit_aggregate(other_run, r.aggregate)
    for bad in (r.aggregate.double(), r.aggregate.half(), r.aggregate.long()):
        with pytest.raises(Rejected, match="dtype"):
            w.glob.submit_aggregate(restated(w, r, bad), bad)
    nan = torch.full((D,), math.nan)
    with pytest.raises(Rejected, match="non_finite"):
        w.glob.submit_aggregate(restated(w, r, nan), nan)
    # A weight is the galaxy's signed count of updates: 1 to its tree size.
    for weight in (0, 5, 2**70):
        with pytest.raises((ValueError, TypeError)):
            restated(w, r, r.aggregate, weight=weight)
    assert w.glob.submit_aggregate(r.statement, r.aggregate)
    assert not w.glob.submit_aggregate(r.statement, r.aggregate)  # resent
    with pytest.raises(Rejected, match="different aggregate"):
        w.glob.submit_aggregate(restated(w, r, r.aggregate * 2), r.aggregate * 2)
    w.glob.finish_round(0)
    with pytest.raises(WrongPhase):
        w.glob.finish_round(0)  # no round is applied twice


def test_only_a_galaxy_can_send_its_root_or_abstain() -> None:
    w = World(4)
    w.commit_all(0, honest(4))
    leaf = w.galaxy.close_commit(0, force=True)
    assert leaf is not None
    stranger = SigningKey.generate()
    with pytest.raises(Rejected, match="bad_signature"):
        w.glob.submit_leaf(sign_statement(stranger, leaf.statement, run=RUN))
    with pytest.raises(Rejected, match="bad_signature"):
        w.glob.submit_abstention(
            sign_statement(stranger, w.galaxy.abstention(0).statement, run=RUN)
        )
    with pytest.raises(Rejected, match="bad_signature"):
        w.glob.submit_leaf(sign_statement(w.galaxy_key, leaf.statement, run="other"))
    assert w.glob.leaves == {} and w.glob.abstained == set()
    assert w.glob.submit_leaf(leaf)
    assert not w.glob.submit_leaf(leaf)  # resent: a no-op
    with pytest.raises(Rejected, match="duplicate"):
        w.glob.submit_abstention(w.galaxy.abstention(0))


def test_a_registered_client_that_stays_silent_stops_holding_the_quorum() -> None:
    """Registered, never committing: it counts in the commit quorum for
    ``idle_rounds`` (2) rounds, then no more, and again once it commits."""
    w = World(4)
    for rnd in range(4):
        ups = honest(4, seed=rnd)
        w.secrets.clear()
        w.commit_all(rnd, {c: v for c, v in ups.items() if c != 3 or rnd == 3})
        reached = w.galaxy.commit_quorum_reached(rnd)
        assert reached == (rnd >= 2), rnd  # 3 of 4 until client 3 is idle
        w.publish_head(rnd)
        w.reveal_all(rnd)
        r = w.galaxy.close_reveal(rnd, force=True)
        w.glob.submit_aggregate(r.statement, r.aggregate)
        w.glob.finish_round(rnd)
    assert w.galaxy.active_clients() == 4  # it committed in round 3


def test_a_galaxy_cannot_claim_more_leaves_than_it_has_clients() -> None:
    """A tree size is the galaxy's own claim, and it bounds the weight: a galaxy
    claiming 2**64 - 1 leaves would own the global average (attack review)."""
    w = World(4)
    w.commit_all(0, honest(4))
    leaf = w.galaxy.close_commit(0, force=True)
    assert leaf is not None
    inflated = dataclasses.replace(leaf.statement, tree_size=2**64 - 1)
    with pytest.raises(Rejected, match="tree_too_large"):
        w.glob.submit_leaf(sign_statement(w.galaxy_key, inflated, run=RUN))
    assert w.glob.leaves == {}
    assert w.glob.submit_leaf(leaf)


def test_a_step_that_would_make_the_model_non_finite_is_not_applied() -> None:
    w = World(4, layers=(1,), agg="fedavg")
    w.commit_all(0, honest(4))
    w.publish_head(0)
    w.reveal_all(0)
    r = w.galaxy.close_reveal(0, force=True)
    w.glob.params.fill_(3.0e38)  # a model at the edge of float32 ...
    w.glob.server = dataclasses.replace(w.glob.server, lr=1e38)  # ... and a step
    w.glob.submit_aggregate(r.statement, r.aggregate)
    before = w.glob.params.clone()
    out = w.glob.finish_round(0)
    assert not out.applied and torch.equal(w.glob.params, before)


def test_registration_admits_only_the_provisioned_key_of_an_id_of_this_galaxy() -> None:
    files = provision(galaxies=3, clients=9)
    keys = {c: client_key(files["clients.seed"], c) for c in range(9)}
    galaxy = GalaxyAggregator(
        1,
        store=STORE_FACTORY(),
        spec=SPEC,
        defense=GalaxyDefense(1),
        key=SigningKey.from_bytes(files["galaxy-1.key"]),
        global_key=SigningKey.from_bytes(files["global.key"]).public_key,
        roster=ClientRoster(
            1, 9, lambda c: c % 3, parse_keyring(files["clients.pub"].decode())
        ),
        run=RUN,
    )

    def register(c: object, key: SigningKey, *, as_id: int | None = None) -> None:
        cid = c if as_id is None else as_id
        galaxy.register(
            c,  # type: ignore[arg-type]
            key.public_key.to_bytes(),
            sign_registration(key, client_id=cid, galaxy_id=1, run=RUN),  # type: ignore[arg-type]
        )

    with pytest.raises(Rejected, match="wrong_galaxy"):
        register(3, keys[3])  # galaxy 0's client
    for bad in (-1, 9, 2**64, 1.0, "4", True):
        with pytest.raises(Rejected, match="bad_client_id"):
            register(bad, keys[4], as_id=4)
    with pytest.raises(Rejected, match="bad_signature"):
        register(4, keys[7])  # another client's (valid) key
    with pytest.raises(Rejected, match="bad_signature"):
        register(4, SigningKey.generate())  # a key minted by the caller
    # The right key, but the signature is over another registration.
    with pytest.raises(Rejected, match="bad_signature"):
        galaxy.register(
            4,
            keys[4].public_key.to_bytes(),
            sign_registration(keys[4], client_id=4, galaxy_id=1, run="other"),
        )
    assert galaxy.store.clients() == []
    register(4, keys[4])
    register(4, keys[4])  # a restarted client registers again: accepted
    register(7, keys[7])
    assert galaxy.store.clients() == [4, 7] and galaxy.active_clients() == 2


def test_withholding_a_reveal_costs_reputation_with_evidence() -> None:
    w = World(6, layers=(1, 4), agg="fedavg")
    for rnd in range(3):
        w.secrets.clear()
        w.commit_all(rnd, honest(6, seed=rnd))
        w.publish_head(rnd)
        for c, (body, nonce, _) in w.secrets.items():
            if c != 5 or rnd == 0:  # client 5 then keeps its update to itself
                w.reveal(rnd, c, body, nonce)
        result = w.galaxy.close_reveal(rnd, force=True)
        assert result.withheld == ((5,) if rnd else ())
        assert result.report.outcomes[5].withheld == bool(rnd)
        w.glob.submit_aggregate(result.statement, result.aggregate)
        w.glob.finish_round(rnd)
    tracker = w.galaxy.defense.tracker
    # A clean round (B = 1, rising at 0.05), then B = 0 twice, history or not
    # (falling at 0.2): 0.5 -> 0.525 -> 0.42 -> 0.336 (scored like a layer-1
    # rejection, B = 0.2 * history, it would be about 0.36; not scored, 0.525).
    assert tracker.reputation(5) == pytest.approx(0.336)
    assert tracker.reputation(0) > 0.525
    records = [e for e in w.store.evidence(5) if e["event"] == "reveal_withheld"]
    assert [e["round"] for e in records] == [1, 2]
    from protogalaxy.crypto.commitment import Commitment
    from protogalaxy.crypto.identity import verify_commitment_signature

    for e in records:
        ev = e["evidence"]
        com = Commitment.from_bytes(bytes.fromhex(ev["leaf"]))
        assert (com.client_id, com.round) == (5, e["round"])
        verify_commitment_signature(
            w.keys[5].public_key,
            com,
            bytes.fromhex(ev["commitment_signature"]),
            run=RUN,
        )


def test_a_commitment_racing_the_close_is_refused_and_in_no_tree() -> None:
    w = World(4)
    w.commit_all(0, {c: v for c, v in honest(4).items() if c < 3})
    # The race: the close is claimed, then client 3's commitment lands. The store
    # refuses it (checked and written in one step), so the client is told and its
    # commitment is in no tree; receipts and the aggregate all use the same three.
    assert w.store.compare_and_set_state((0, "commit"), (0, "closing"))
    late, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=3, galaxy_id=0, round=0)
    with pytest.raises(PhaseClosed):
        w.store.add_commitment(
            0, 3, late.to_bytes(), sign_commitment(w.keys[3], late, run=RUN)
        )
    with pytest.raises(WrongPhase):
        w.galaxy.submit_commitment(late, sign_commitment(w.keys[3], late, run=RUN))
    leaf = w.galaxy.close_commit(0, force=True)  # finishes the interrupted close
    assert leaf is not None and leaf.statement.tree_size == 3
    w.glob.submit_leaf(leaf)
    head = w.glob.close_leaves(0)
    w.galaxy.accept_head(0, head, w.glob.proof_for(0))
    for c in range(3):
        r = w.galaxy.receipt(0, c)
        verify_receipt(r, global_key=w.global_key.public_key, run=RUN, round=0)
        assert r.galaxy_leaf.tree_size == 3
    with pytest.raises(UnknownClient):
        w.galaxy.receipt(0, 3)


def test_an_empty_round_ends_without_a_leaf() -> None:
    w = World(3)
    w.galaxy.open_round(0)
    assert w.galaxy.close_commit(0, force=True) is None
    assert w.galaxy.state == (0, "done")
    w.galaxy.open_round(1)
    assert w.galaxy.state == (1, "commit")


def test_the_aggregate_bytes_do_not_depend_on_the_arrival_order() -> None:
    """A galaxy adds its clients' updates in client-id order, whatever order they
    were committed and revealed in: float addition is not associative (here
    (1e20 + 1) - 1e20 = 0 but (1e20 - 1e20) + 1 = 1), so without that order the
    same updates would give different bytes, and a replay could not match them."""
    ups = honest(3, seed=5)
    ups[0][0], ups[1][0], ups[2][0] = 1e20, 1.0, -1e20
    w = World(3, layers=(1,), agg="fedavg")
    out = []
    for rnd, order in enumerate(([0, 1, 2], [0, 2, 1], [2, 0, 1])):
        w.secrets.clear()
        w.commit_all(rnd, {c: ups[c] for c in order})
        w.publish_head(rnd)
        for c in order:
            body, nonce, _ = w.secrets[c]
            w.reveal(rnd, c, body, nonce)
        result = w.galaxy.close_reveal(rnd, force=True)
        assert result.aggregate is not None and result.statement is not None
        out.append(result.aggregate.numpy().tobytes())
        w.glob.submit_aggregate(result.statement, result.aggregate)
        w.glob.finish_round(rnd)
    assert out[0] == out[1] == out[2]
    assert torch.frombuffer(bytearray(out[0]), dtype=torch.float32)[0] == 0.0


@pytest.mark.parametrize("valid_first", [True, False])
def test_a_client_has_one_fate_a_round_when_its_reveals_race(valid_first: bool) -> None:
    """A client sends a valid and a garbage reveal at once. Each passes the "no
    reveal yet" checks before the other is written; the store must still give the
    client one fate, or its acknowledged update is also recorded as rejected and
    the honest galaxy's transcript contradicts its own acknowledgement (a client
    could get honest galaxies isolated this way)."""
    w = World(4, layers=(1,), agg="fedavg")
    w.commit_all(0, honest(4))
    w.publish_head(0)
    body, nonce, _ = w.secrets[0]
    junk = (encode_update(SPEC.unflatten(torch.ones(D))), nonce)
    first, second = ((body, nonce), junk) if valid_first else (junk, (body, nonce))
    store = w.store
    answers: dict[str, object] = {}
    hook = "add_rejection" if valid_first else "add_reveal"
    original = getattr(store, hook)

    def interleaved(*args: object, **kwargs: object) -> object:
        # The other reveal runs to its end between this one's checks and write.
        setattr(store, hook, original)
        try:
            w.reveal(0, 0, *first)
            answers["first"] = "accepted"
        except Rejected as exc:
            answers["first"] = exc.reason
        return original(*args, **kwargs)

    setattr(store, hook, interleaved)
    try:
        w.reveal(0, 0, *second)
        answers["second"] = "accepted"
    except Rejected as exc:
        answers["second"] = exc.reason
    assert answers == (
        {"first": "accepted", "second": "commitment_mismatch"}
        if valid_first
        else {"first": "commitment_mismatch", "second": "duplicate"}
    )
    in_reveals = 0 in w.store.reveals(0)
    in_rejections = 0 in w.store.rejections(0)
    assert in_reveals != in_rejections and in_reveals == valid_first
    for c in (1, 2, 3):
        w.reveal(0, c, *w.secrets[c][:2])
    w.galaxy.close_reveal(0, force=True)
    published = w.galaxy.transcript(0)
    assert published is not None
    fates = {e["client"]: e["fate"] for e in published[0].body["clients"]}
    assert fates[0] == ("aggregated" if valid_first else "rejected")


# -- faults: a galaxy restarted in every state of a round, and replicas ----------

KILL_POINTS = ["commit", "closing", "committed", "reveal", "aggregating", "done"]


class Killed(BaseException):
    """The process died here (nothing after this point ran)."""


def play_two_rounds(w: World, kill: str | None = None) -> list[bytes]:
    """Round 0 clean; in round 1 client 4 reveals a body that does not match its
    commitment and client 5 withholds, so reputations and evidence change. With
    ``kill``, galaxy 0's process dies at that point of round 1 and a fresh one
    (nothing but the store) finishes the round. The aggregate bytes of each round.
    """
    out = []
    for rnd in range(2):
        w.secrets.clear()
        w.commit_all(rnd, honest(6, seed=rnd))
        faulty = rnd == 1
        if faulty and kill == "commit":
            w.galaxy = w.replica()
        if faulty and kill == "closing":
            # The close claimed the phase and died before taking the snapshot.
            assert w.store.compare_and_set_state((1, "commit"), (1, "closing"))
            w.galaxy = w.replica()
        leaf = w.galaxy.close_commit(rnd, force=True)
        assert leaf is not None
        if faulty and kill == "committed":
            w.galaxy = w.replica()
        w.glob.submit_leaf(leaf)
        head = w.glob.close_leaves(rnd)
        w.galaxy.accept_head(rnd, head, w.glob.proof_for(0))
        if faulty:
            _, nonce, com = w.secrets[4]
            w.secrets[4] = (encode_update(SPEC.unflatten(torch.ones(D))), nonce, com)
        for c in range(5 if faulty else 6):
            if faulty and kill == "reveal" and c == 2:
                w.galaxy = w.replica()
                w.reveal(rnd, 1, *w.secrets[1][:2])  # a resend: accepted once
            try:
                w.reveal(rnd, c, *w.secrets[c][:2])
            except Rejected as exc:
                assert (c, exc.reason) == (4, "commitment_mismatch")
        if faulty and kill == "aggregating":
            real = w.store.finish_round

            def dies(*args: object, **kwargs: object) -> bool:
                raise Killed  # everything computed, nothing stored

            w.store.finish_round = dies  # type: ignore[method-assign]
            with pytest.raises(Killed):
                w.galaxy.close_reveal(rnd, force=True)
            w.store.finish_round = real  # type: ignore[method-assign]
            assert w.galaxy.state == (1, "aggregating")
            w.galaxy = w.replica()
            result = w.galaxy.resume_aggregation(rnd)
        else:
            result = w.galaxy.close_reveal(rnd, force=True)
        if faulty and kill == "done":
            w.galaxy = w.replica()
            with pytest.raises(WrongPhase):
                w.galaxy.resume_aggregation(rnd)
        assert result.aggregate is not None and result.statement is not None
        out.append(result.aggregate.numpy().tobytes())
        w.glob.submit_aggregate(result.statement, result.aggregate)
        w.glob.finish_round(rnd)
    return out


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_a_galaxy_killed_in_any_state_finishes_the_round_as_if_it_had_not(
    kill: str,
) -> None:
    """A galaxy process killed in each state of a round, and a fresh one on the
    same store: the same aggregate bytes, transcript, reputations and evidence as
    a run without the fault, and every accepted reveal aggregated once."""
    files = provision(galaxies=1, clients=6)
    clean = World(6, layers=(1, 2, 4), agg="fedavg", files=files)
    expected = play_two_rounds(clean)
    w = World(6, layers=(1, 2, 4), agg="fedavg", files=files)
    assert play_two_rounds(w, kill) == expected
    assert w.galaxy.state == (1, "done")
    got, want = w.galaxy.transcript(1), clean.galaxy.transcript(1)
    assert got is not None and want is not None
    assert got[0].to_bytes() == want[0].to_bytes()  # signatures are deterministic
    fates = {e["client"]: e["fate"] for e in got[0].body["clients"]}
    assert fates == {
        0: "aggregated",
        1: "aggregated",
        2: "aggregated",
        3: "aggregated",
        4: "rejected",
        5: "withheld",
    }
    assert w.store.load_reputation() == clean.store.load_reputation()
    assert w.store.evidence() == clean.store.evidence()
    assert [e["event"] for e in w.store.evidence()] == [
        "reveal_rejected",
        "reveal_withheld",
    ]


def test_a_stale_replica_never_writes_old_reputations() -> None:
    """Two replicas of one galaxy: replica A closes round 0, where client 4 loses
    reputation; replica B, which read the store before that, closes round 1. B
    must start round 1 from A's state: without that it would write its own,
    older reputations back, and undo what round 0 did (a quarantine, say)."""
    w = World(6, layers=(1, 2, 4), agg="fedavg")
    a, b = w.galaxy, w.replica()
    for rnd, closer in enumerate((a, b)):
        w.secrets.clear()
        w.commit_all(rnd, honest(6, seed=rnd))
        w.publish_head(rnd)
        if rnd == 0:
            _, nonce, com = w.secrets[4]
            w.secrets[4] = (encode_update(SPEC.unflatten(torch.ones(D))), nonce, com)
        for c in range(6):
            try:
                w.reveal(rnd, c, *w.secrets[c][:2])
            except Rejected:
                assert (rnd, c) == (0, 4)
        result = closer.close_reveal(rnd, force=True)
        w.glob.submit_aggregate(result.statement, result.aggregate)
        w.glob.finish_round(rnd)
        if rnd == 0:
            after_round_0 = w.store.load_reputation()
    saved = w.store.load_reputation()
    assert saved is not None and after_round_0 is not None
    # Round 1 went from round 0's state: client 4 kept its loss, and round 1
    # counted on top of round 0 for everyone.
    assert saved["clients"]["4"]["reputation"] < saved["clients"]["0"]["reputation"]
    assert all(saved["clients"][str(c)]["rounds"] == 2 for c in range(6))
    assert json.loads(json.dumps(b.defense.tracker.state_dict())) == saved


def test_a_restarted_global_aggregator_serves_the_head_it_signed() -> None:
    """The signed round (roots and head) is handed to ``persist`` before the head
    is in force; a fresh aggregator takes it back and serves the same head; a
    document that is not exactly what was signed is refused."""
    w = World(4, layers=(1,), agg="fedavg")
    w.commit_all(0, honest(4))
    leaf = w.galaxy.close_commit(0, force=True)
    assert leaf is not None
    w.glob.submit_leaf(leaf)

    def unwritable(doc: dict[str, object]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        w.glob.close_leaves(0, persist=unwritable)
    assert w.glob.phase == "leaves" and w.glob.head is None  # handed to no one
    stored: list[dict[str, object]] = []
    head = w.glob.close_leaves(0, persist=stored.append)
    assert stored == [w.glob.signed_round()]

    def fresh() -> GlobalAggregator:
        return GlobalAggregator(
            key=w.global_key,
            galaxy_keys=parse_keyring(w.files["galaxies.pub"].decode()),
            assignment=Assignment(4, 1),
            run=RUN,
            params=torch.zeros(D),
            defense=GlobalDefense(w.cfg),
        )

    again = fresh()
    again.resume_signed_round(json.loads(json.dumps(stored[0])))
    assert again.head == head and again.phase == "aggregates"
    assert again.proof_for(0) == w.glob.proof_for(0)
    # Anything else is refused: a head of another key, roots that do not make it.
    forged = dict(stored[0])
    other = SigningKey.generate()
    from protogalaxy.crypto.heads import sign_round_head

    forged["head"] = sign_round_head(other, head.head).to_dict()
    with pytest.raises(ValueError):
        fresh().resume_signed_round(forged)
    empty = {**stored[0], "leaves": []}
    with pytest.raises(ValueError):
        fresh().resume_signed_round(empty)


def test_a_close_that_could_not_be_stored_leaves_no_reputation_behind() -> None:
    """The store fails at the close's one write (Redis went away): the round is
    still ``aggregating``, nothing of it is stored, and this process's tracker
    does not keep the reputations of a close that never happened (its banned
    checks and gauges would use them); a later close does the round once."""
    w = World(6, layers=(1, 2, 4), agg="fedavg")
    w.commit_all(0, honest(6))
    w.publish_head(0)
    for c in range(5):  # client 5 withholds: its reputation falls at the close
        w.reveal(0, c, *w.secrets[c][:2])
    real = w.store.finish_round

    def down(*args: object, **kwargs: object) -> bool:
        raise ConnectionError("the store went away")

    w.store.finish_round = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        w.galaxy.close_reveal(0, force=True)
    w.store.finish_round = real  # type: ignore[method-assign]
    assert w.galaxy.state == (0, "aggregating")
    w.galaxy.active_clients()  # any use of the tracker
    assert w.galaxy.defense.tracker.reputation(5) == 0.5
    w.galaxy.resume_aggregation(0)
    assert w.galaxy.defense.tracker.reputation(5) < 0.5
    assert [e["event"] for e in w.store.evidence()] == ["reveal_withheld"]

"""The galaxy and global round state machines, over the in-memory stores."""

from __future__ import annotations

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
from protogalaxy.crypto.identity import sign_commitment, sign_reveal
from protogalaxy.defense.pipeline import DefenseConfig, GalaxyDefense, GlobalDefense
from protogalaxy.protocol.galaxy import (
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


STORE_FACTORY: Callable[[], GalaxyStore] = MemoryGalaxyStore


@pytest.fixture(params=["memory", "redis"], autouse=True)
def galaxy_store(request: pytest.FixtureRequest) -> None:
    """Every protocol test runs over both stores (World picks up the choice)."""
    global STORE_FACTORY
    if request.param == "memory":
        STORE_FACTORY = MemoryGalaxyStore
    else:
        from services.redis_store import RedisGalaxyStore

        url = request.getfixturevalue("redis_url")
        STORE_FACTORY = lambda: RedisGalaxyStore.from_url(url, galaxy=0)  # noqa: E731


class World:
    """One galaxy (id 0) with `n` clients and a global aggregator."""

    def __init__(
        self,
        n: int = 6,
        layers: tuple[int, ...] = (1, 2, 3, 4, 5),
        agg: str = "multikrum",
    ):
        self.global_key = SigningKey.generate()
        self.keys = {c: SigningKey.generate() for c in range(n)}
        cfg = DefenseConfig(
            layers=frozenset(layers), aggregator=agg, byzantine_fraction=0.2
        )
        self.store = STORE_FACTORY()
        self.galaxy = GalaxyAggregator(
            0,
            store=self.store,
            spec=SPEC,
            defense=GalaxyDefense(0, cfg),
            global_key=self.global_key.public_key,
            max_update_bytes=4096,
        )
        for c, k in self.keys.items():
            self.galaxy.register(c, k.public_key.to_bytes())
        self.glob = GlobalAggregator(
            key=self.global_key,
            galaxies=[0],
            params=torch.zeros(D),
            defense=GlobalDefense(cfg),
        )
        self.secrets: dict[int, tuple[bytes, bytes, object]] = {}

    def commit_all(self, rnd: int, updates: dict[int, torch.Tensor]) -> None:
        self.galaxy.open_round(rnd)
        for c, vec in updates.items():
            tensors = SPEC.unflatten(vec)
            com, nonce = commit(tensors, client_id=c, galaxy_id=0, round=rnd)
            self.galaxy.submit_commitment(com, sign_commitment(self.keys[c], com))
            self.secrets[c] = (encode_update(tensors), nonce, com)

    def publish_head(self, rnd: int) -> None:
        leaf = self.galaxy.close_commit(rnd, force=True)
        assert leaf is not None
        self.glob.submit_leaf(leaf)
        head = self.glob.close_leaves(rnd)
        self.galaxy.accept_head(rnd, head, self.glob.proof_for(0))

    def reveal(self, rnd: int, c: int, body: bytes, nonce: bytes) -> None:
        com = self.secrets[c][2]
        sig = sign_reveal(self.keys[c], com, body, nonce)  # type: ignore[arg-type]
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
            receipt, global_key=w.global_key.public_key, commitment=com, round=0
        )
    w.reveal_all(0)
    result = w.galaxy.close_reveal(0, force=True)
    assert result.aggregate is not None and result.weight == 6
    assert torch.allclose(
        result.aggregate, torch.stack(list(ups.values())).mean(0), atol=1e-6
    )
    assert w.glob.submit_aggregate(0, 0, result.root, result.aggregate, result.weight)
    out = w.glob.finish_round(0)
    assert out.applied and torch.allclose(w.glob.params, result.aggregate)
    assert w.glob.round == 1 and w.glob.audit_log.size == 1
    # Round 2 extends the log consistently.
    w.secrets.clear()
    w.commit_all(1, honest(6, seed=1))
    w.publish_head(1)
    w.reveal_all(1)
    r1 = w.galaxy.close_reveal(1, force=True)
    w.glob.submit_aggregate(1, 0, r1.root, r1.aggregate, r1.weight)
    w.glob.finish_round(1)
    log = w.glob.audit_log
    verify_consistency(1, 2, log.head(1).root, log.root, log.consistency_proof(1))


def test_commitment_checks() -> None:
    w = World(4)
    w.galaxy.open_round(3)
    com, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=1, galaxy_id=0, round=3)
    with pytest.raises(Rejected, match="bad_signature"):
        w.galaxy.submit_commitment(
            com, sign_commitment(w.keys[2], com)
        )  # another's key
    stranger = SigningKey.generate()
    c9, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=9, galaxy_id=0, round=3)
    with pytest.raises(UnknownClient):
        w.galaxy.submit_commitment(c9, sign_commitment(stranger, c9))
    old, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=1, galaxy_id=0, round=2)
    with pytest.raises(WrongPhase):  # an old commitment replayed in a later round
        w.galaxy.submit_commitment(old, sign_commitment(w.keys[1], old))
    other_galaxy, _ = commit(
        SPEC.unflatten(torch.zeros(D)), client_id=1, galaxy_id=5, round=3
    )
    with pytest.raises(Rejected, match="wrong_round"):
        w.galaxy.submit_commitment(
            other_galaxy, sign_commitment(w.keys[1], other_galaxy)
        )
    w.galaxy.submit_commitment(com, sign_commitment(w.keys[1], com))
    w.galaxy.submit_commitment(com, sign_commitment(w.keys[1], com))  # identical: no-op
    second, _ = commit(SPEC.unflatten(torch.ones(D)), client_id=1, galaxy_id=0, round=3)
    with pytest.raises(Rejected, match="duplicate"):
        w.galaxy.submit_commitment(second, sign_commitment(w.keys[1], second))
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
    forged = sign_reveal(w.keys[4], w.secrets[3][2], b"garbage", bytes(32))  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="bad_signature"):
        w.galaxy.submit_reveal(0, 3, b"garbage", bytes(32), forged)
    w.reveal(0, 3, w.secrets[3][0], w.secrets[3][1])
    assert {c: w.store.reveals(0)[c] for c in before} == before
    assert w.store.rejections(0) == {1: "commitment_mismatch", 2: "commitment_mismatch"}


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
    w.galaxy.submit_commitment(com, sign_commitment(w.keys[0], com))
    w.publish_head(0)
    w.secrets[0] = (encode_update(tensors), nonce, com)
    with pytest.raises(Rejected, match=reason):
        w.reveal(0, 0, encode_update(tensors), nonce)
    assert w.store.rejections(0) == {0: reason}


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
        w.glob.submit_aggregate(rnd, 0, result.root, result.aggregate, result.weight)
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


def test_global_aggregate_binding_and_tampering() -> None:
    w = World(4, layers=(1,), agg="fedavg")
    w.commit_all(0, honest(4))
    w.publish_head(0)
    w.reveal_all(0)
    r = w.galaxy.close_reveal(0, force=True)
    with pytest.raises(Rejected, match="another root"):
        w.glob.submit_aggregate(0, 0, bytes(32), r.aggregate, r.weight)
    assert w.glob.submit_aggregate(0, 0, r.root, r.aggregate, r.weight)
    assert not w.glob.submit_aggregate(0, 0, r.root, r.aggregate, r.weight)  # resent
    with pytest.raises(Rejected, match="different aggregate"):
        w.glob.submit_aggregate(0, 0, r.root, r.aggregate * 2, r.weight)
    with pytest.raises(Rejected, match="shape"):
        w.glob.submit_aggregate(0, 0, r.root, torch.full((D,), math.nan), r.weight)
    w.glob.finish_round(0)
    with pytest.raises(WrongPhase):
        w.glob.finish_round(0)  # no round is applied twice


def test_a_commitment_racing_the_close_is_refused_and_in_no_tree() -> None:
    w = World(4)
    w.commit_all(0, {c: v for c, v in honest(4).items() if c < 3})
    # The race: the close is claimed, then client 3's commitment lands. The store
    # refuses it (checked and written in one step), so the client is told and its
    # commitment is in no tree; receipts and the aggregate all use the same three.
    assert w.store.compare_and_set_state((0, "commit"), (0, "closing"))
    late, _ = commit(SPEC.unflatten(torch.zeros(D)), client_id=3, galaxy_id=0, round=0)
    with pytest.raises(PhaseClosed):
        w.store.add_commitment(0, 3, late.to_bytes(), sign_commitment(w.keys[3], late))
    with pytest.raises(WrongPhase):
        w.galaxy.submit_commitment(late, sign_commitment(w.keys[3], late))
    leaf = w.galaxy.close_commit(0, force=True)  # finishes the interrupted close
    assert leaf is not None and leaf.tree_size == 3
    w.glob.submit_leaf(leaf)
    head = w.glob.close_leaves(0)
    w.galaxy.accept_head(0, head, w.glob.proof_for(0))
    for c in range(3):
        r = w.galaxy.receipt(0, c)
        verify_receipt(r, global_key=w.global_key.public_key, round=0)
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

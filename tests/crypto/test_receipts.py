"""Two-level receipts: every honest receipt verifies, every tampered one fails."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from protogalaxy.crypto.commitment import Commitment, commit
from protogalaxy.crypto.errors import (
    MalformedProofError,
    ProofError,
    ReceiptError,
    SignatureError,
    VerificationError,
)
from protogalaxy.crypto.heads import sign_round_head
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.merkle import InclusionProof, verify_inclusion
from protogalaxy.crypto.receipts import Receipt, issue_receipt, verify_receipt
from protogalaxy.crypto.trees import GalaxyLeaf, GalaxyTree, GlobalTree

ROUND = 4
RUN = "r1"
GALAXIES = 3
CLIENTS = 20


@pytest.fixture(scope="module")
def world() -> dict[str, object]:
    key = SigningKey.generate()
    commitments: dict[int, list[Commitment]] = {g: [] for g in range(GALAXIES)}
    for cid in range(CLIENTS):
        update = {"w": np.full(4, cid, dtype=np.float32)}
        c, _ = commit(update, client_id=cid, galaxy_id=cid % GALAXIES, round=ROUND)
        commitments[cid % GALAXIES].append(c)
    galaxies = {
        g: GalaxyTree(reversed(cs), galaxy_id=g, round=ROUND)
        for g, cs in commitments.items()
    }
    global_tree = GlobalTree((t.leaf() for t in galaxies.values()), round=ROUND)
    head = sign_round_head(key, global_tree.head(timestamp_ms=1, run=RUN))
    return {"key": key, "galaxies": galaxies, "global": global_tree, "head": head}


def receipt_for(world: dict[str, object], cid: int) -> Receipt:
    galaxies = world["galaxies"]
    assert isinstance(galaxies, dict)
    return issue_receipt(cid, galaxies[cid % GALAXIES], world["global"], world["head"])  # type: ignore[arg-type]


def pub(world: dict[str, object]):  # type: ignore[no-untyped-def]
    return world["key"].public_key  # type: ignore[attr-defined]


def test_every_receipt_verifies_and_round_trips(world: dict[str, object]) -> None:
    for cid in range(CLIENTS):
        r = receipt_for(world, cid)
        verify_receipt(
            r, global_key=pub(world), run=RUN, commitment=r.commitment, round=ROUND
        )
        again = Receipt.from_json(r.to_json())
        assert again == r
        verify_receipt(again, global_key=pub(world), run=RUN)


def test_galaxy_tree_is_canonical(world: dict[str, object]) -> None:
    galaxies = world["galaxies"]
    assert isinstance(galaxies, dict)
    t = galaxies[1]
    assert t.client_ids == sorted(t.client_ids)
    assert GalaxyTree(t.commitments[::-1], galaxy_id=1, round=ROUND).root == t.root
    verify_inclusion(t.commitment_of(7).to_bytes(), t.proof_for(7), t.root)
    with pytest.raises(KeyError):
        t.proof_for(8)  # client 8 is in galaxy 2


def test_galaxy_tree_rejects_bad_commitments(world: dict[str, object]) -> None:
    c = receipt_for(world, 1).commitment
    with pytest.raises(ValueError, match="more than one"):
        GalaxyTree([c, c], galaxy_id=1, round=ROUND)
    with pytest.raises(ValueError, match="galaxy 1 round 4"):
        GalaxyTree([c], galaxy_id=2, round=ROUND)
    with pytest.raises(ValueError, match="at least one"):
        GalaxyTree([], galaxy_id=1, round=ROUND)


def test_wrong_key_or_tampered_head(world: dict[str, object]) -> None:
    r = receipt_for(world, 5)
    with pytest.raises(SignatureError):
        verify_receipt(r, global_key=SigningKey.generate().public_key, run=RUN)
    head = r.head
    tampered = dataclasses.replace(
        head, head=dataclasses.replace(head.head, root=bytes(32))
    )
    with pytest.raises(SignatureError):
        verify_receipt(
            dataclasses.replace(r, head=tampered), global_key=pub(world), run=RUN
        )
    # A head re-signed by an impostor key, presented with the impostor's signer field.
    impostor = SigningKey.generate()
    resigned = sign_round_head(impostor, head.head)
    with pytest.raises(SignatureError):
        verify_receipt(
            dataclasses.replace(r, head=resigned), global_key=pub(world), run=RUN
        )
    # The same trees under a head the global key signed for another run: a receipt
    # of run r2 never passes for a client of run r1, and the reverse.
    key = world["key"]
    other_run = sign_round_head(key, dataclasses.replace(head.head, run="r2"))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="run"):
        verify_receipt(
            dataclasses.replace(r, head=other_run), global_key=pub(world), run=RUN
        )
    with pytest.raises(SignatureError, match="run"):
        verify_receipt(r, global_key=pub(world), run="r2")


def test_binding_errors(world: dict[str, object]) -> None:
    r = receipt_for(world, 5)  # galaxy 2
    other = receipt_for(world, 6)  # galaxy 0
    with pytest.raises(ReceiptError, match="another commitment"):
        verify_receipt(r, global_key=pub(world), run=RUN, commitment=other.commitment)
    with pytest.raises(ReceiptError, match="expected round"):
        verify_receipt(r, global_key=pub(world), run=RUN, round=ROUND + 1)
    with pytest.raises(ReceiptError, match="galaxy"):
        verify_receipt(
            dataclasses.replace(r, galaxy_leaf=other.galaxy_leaf),
            global_key=pub(world),
            run=RUN,
        )
    old = dataclasses.replace(r.commitment, round=ROUND - 1)
    with pytest.raises(ReceiptError, match="round mismatch"):
        verify_receipt(
            dataclasses.replace(r, commitment=old), global_key=pub(world), run=RUN
        )


def test_proof_tampering(world: dict[str, object]) -> None:
    r = receipt_for(world, 5)
    key = pub(world)
    # A commitment of another client of the same galaxy, with this client's proof.
    neighbour = receipt_for(world, 8)
    with pytest.raises(ProofError):
        verify_receipt(
            dataclasses.replace(r, commitment=neighbour.commitment),
            global_key=key,
            run=RUN,
        )
    # A galaxy leaf with a forged root.
    forged_leaf = dataclasses.replace(r.galaxy_leaf, root=bytes(32))
    with pytest.raises(ProofError):
        verify_receipt(
            dataclasses.replace(r, galaxy_leaf=forged_leaf), global_key=key, run=RUN
        )
    # A galaxy leaf that lies about its tree size.
    lying_leaf = dataclasses.replace(
        r.galaxy_leaf, tree_size=r.galaxy_leaf.tree_size + 1
    )
    with pytest.raises(ProofError):
        verify_receipt(
            dataclasses.replace(r, galaxy_leaf=lying_leaf), global_key=key, run=RUN
        )
    # Proofs whose sizes differ from the signed ones are refused outright.
    gp = r.galaxy_proof
    bigger = InclusionProof(gp.leaf_index, gp.tree_size + 1, gp.path)
    with pytest.raises(MalformedProofError, match="trusted tree_size"):
        verify_receipt(
            dataclasses.replace(r, galaxy_proof=bigger), global_key=key, run=RUN
        )
    cp = r.client_proof
    smaller = InclusionProof(cp.leaf_index, cp.tree_size - 1, cp.path)
    with pytest.raises(MalformedProofError, match="trusted tree_size"):
        verify_receipt(
            dataclasses.replace(r, client_proof=smaller), global_key=key, run=RUN
        )
    flipped = [bytes([cp.path[0][0] ^ 1]) + cp.path[0][1:], *cp.path[1:]]
    with pytest.raises(ProofError):
        verify_receipt(
            dataclasses.replace(
                r, client_proof=InclusionProof(cp.leaf_index, cp.tree_size, flipped)
            ),
            global_key=key,
            run=RUN,
        )
    with pytest.raises(VerificationError):
        verify_receipt("receipt", global_key=key, run=RUN)  # type: ignore[arg-type]


def test_global_tree_rejects_duplicates_and_other_rounds() -> None:
    leaf = GalaxyLeaf(1, 0, 3, bytes(32))
    with pytest.raises(ValueError, match="more than one"):
        GlobalTree([leaf, leaf], round=1)
    with pytest.raises(ValueError, match="round"):
        GlobalTree([leaf], round=2)
    assert GalaxyLeaf.from_bytes(leaf.to_bytes()) == leaf
    assert GalaxyLeaf.from_dict(leaf.to_dict()) == leaf
    with pytest.raises(ValueError, match=r"tree_size must be in \[1, 2\*\*64\)"):
        GalaxyLeaf(1, 0, 0, bytes(32))

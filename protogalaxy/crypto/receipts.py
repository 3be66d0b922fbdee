"""Receipts: a client's two-level proof that its commitment is in the signed round.

A receipt holds the client's commitment, its inclusion proof in the galaxy tree, the
galaxy's leaf in the global tree and that leaf's inclusion proof, and the signed round
head. :func:`verify_receipt` checks all of it against the global aggregator's trusted
public key and the client's run. Every tree size is taken from signed or
already-authenticated data: the global tree's size from the signed head, the galaxy
tree's size from the galaxy leaf once that leaf is proven under the signed root. A
proof that claims another size is rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.errors import ReceiptError
from protogalaxy.crypto.heads import SignedRoundHead
from protogalaxy.crypto.identity import VerifyKey
from protogalaxy.crypto.merkle import InclusionProof, verify_inclusion
from protogalaxy.crypto.trees import GalaxyLeaf, GalaxyTree, GlobalTree

__all__ = ["Receipt", "issue_receipt", "verify_receipt"]


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that ``commitment`` is in its galaxy's tree, whose root is in the signed
    global tree of the round."""

    commitment: Commitment
    client_proof: InclusionProof
    galaxy_leaf: GalaxyLeaf
    galaxy_proof: InclusionProof
    head: SignedRoundHead

    def to_dict(self) -> dict[str, Any]:
        return {
            "commitment": self.commitment.to_dict(),
            "client_proof": self.client_proof.to_dict(),
            "galaxy_leaf": self.galaxy_leaf.to_dict(),
            "galaxy_proof": self.galaxy_proof.to_dict(),
            "head": self.head.to_dict(),
        }

    @classmethod
    def from_dict(cls, obj: object) -> Receipt:
        keys = {"commitment", "client_proof", "galaxy_leaf", "galaxy_proof", "head"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ValueError(f"receipt: expected an object with keys {sorted(keys)}")
        return cls(
            Commitment.from_dict(obj["commitment"]),
            InclusionProof.from_dict(obj["client_proof"]),
            GalaxyLeaf.from_dict(obj["galaxy_leaf"]),
            InclusionProof.from_dict(obj["galaxy_proof"]),
            SignedRoundHead.from_dict(obj["head"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Receipt:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"receipt: malformed JSON ({exc})") from None
        return cls.from_dict(obj)


def issue_receipt(
    client_id: int, galaxy: GalaxyTree, global_tree: GlobalTree, head: SignedRoundHead
) -> Receipt:
    """Assemble the receipt of ``client_id`` from the round's trees and signed head."""
    return Receipt(
        galaxy.commitment_of(client_id),
        galaxy.proof_for(client_id),
        global_tree.leaf_of(galaxy.galaxy_id),
        global_tree.proof_for(galaxy.galaxy_id),
        head,
    )


def verify_receipt(
    receipt: Receipt,
    *,
    global_key: VerifyKey,
    run: str,
    commitment: Commitment | None = None,
    round: int | None = None,
) -> None:
    """Verify a receipt completely; fail closed.

    Parameters
    ----------
    receipt
        The receipt as received from the galaxy aggregator.
    global_key
        The global aggregator's trusted public key (pinned by the client).
    run
        The run the client takes part in; the signed head must be of that run.
    commitment
        The commitment the client made; when given, the receipt must be for exactly
        this commitment.
    round
        The round the client expects; when given, the signed head must be for it.

    Raises
    ------
    SignatureError
        The head is not signed by ``global_key``, or is of another run.
    ReceiptError
        Round, galaxy or commitment of the parts do not bind together.
    ProofError
        Either inclusion proof fails, or claims a size other than the signed one.
    """
    if not isinstance(receipt, Receipt):
        raise ReceiptError(f"expected a Receipt, got {type(receipt).__name__}")
    receipt.head.verify(global_key, run=run)
    head = receipt.head.head
    if round is not None and head.round != round:
        raise ReceiptError(
            f"signed head is for round {head.round}, expected round {round}"
        )
    c = receipt.commitment
    if commitment is not None and c.to_bytes() != commitment.to_bytes():
        raise ReceiptError("receipt is for another commitment than the one made")
    leaf = receipt.galaxy_leaf
    if leaf.round != head.round or c.round != head.round:
        raise ReceiptError(
            f"round mismatch: head {head.round}, galaxy leaf {leaf.round}, "
            f"commitment {c.round}"
        )
    if leaf.galaxy_id != c.galaxy_id:
        raise ReceiptError(
            f"commitment is for galaxy {c.galaxy_id}, "
            f"the galaxy leaf for {leaf.galaxy_id}"
        )
    verify_inclusion(
        leaf.to_bytes(), receipt.galaxy_proof, head.root, tree_size=head.tree_size
    )
    verify_inclusion(
        c.to_bytes(), receipt.client_proof, leaf.root, tree_size=leaf.tree_size
    )

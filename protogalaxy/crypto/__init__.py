"""Verifiable commitments: RFC 9162 Merkle trees, commitments, Ed25519 identities,
two-level receipts and the audit log. Everything here fails closed."""

from protogalaxy.crypto.audit import AuditLog, LogHead, verify_log_extension
from protogalaxy.crypto.commitment import (
    Commitment,
    commit,
    update_digest,
    verify_reveal,
)
from protogalaxy.crypto.errors import (
    CommitmentMismatchError,
    MalformedProofError,
    ProofError,
    ReceiptError,
    RootMismatchError,
    SignatureError,
    VerificationError,
)
from protogalaxy.crypto.heads import RoundHead, SignedRoundHead, sign_round_head
from protogalaxy.crypto.identity import SigningKey, VerifyKey
from protogalaxy.crypto.keyring import parse_keyring, provision
from protogalaxy.crypto.merkle import (
    InclusionProof,
    MerkleTree,
    verify_consistency,
    verify_inclusion,
)
from protogalaxy.crypto.receipts import Receipt, issue_receipt, verify_receipt
from protogalaxy.crypto.statements import (
    Abstention,
    AggregateStatement,
    Signed,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf, GalaxyTree, GlobalTree

__all__ = [
    "Abstention",
    "AggregateStatement",
    "AuditLog",
    "Commitment",
    "CommitmentMismatchError",
    "GalaxyLeaf",
    "GalaxyTree",
    "GlobalTree",
    "InclusionProof",
    "LogHead",
    "MalformedProofError",
    "MerkleTree",
    "ProofError",
    "Receipt",
    "ReceiptError",
    "RootMismatchError",
    "RoundHead",
    "SignatureError",
    "Signed",
    "SignedRoundHead",
    "SigningKey",
    "VerificationError",
    "VerifyKey",
    "commit",
    "issue_receipt",
    "parse_keyring",
    "provision",
    "sign_round_head",
    "sign_statement",
    "update_digest",
    "verify_consistency",
    "verify_inclusion",
    "verify_log_extension",
    "verify_receipt",
    "verify_reveal",
]

"""Typed verification errors. Every verifier in :mod:`protogalaxy.crypto` fails closed:
it returns ``None`` on success and raises a subclass of :class:`VerificationError`."""

from __future__ import annotations

__all__ = [
    "CommitmentMismatchError",
    "MalformedProofError",
    "ProofError",
    "ReceiptError",
    "RootMismatchError",
    "SignatureError",
    "VerificationError",
]


class VerificationError(Exception):
    """Base class: a proof, signature, commitment or receipt did not verify."""


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof did not verify."""


class MalformedProofError(ProofError):
    """The proof cannot be valid for the stated sizes or index (wrong length, sizes
    out of range, elements of the wrong size)."""


class RootMismatchError(ProofError):
    """The proof is well formed, but the root it leads to differs from the expected."""


class SignatureError(VerificationError):
    """An Ed25519 signature did not verify, or the key or signature is malformed."""


class CommitmentMismatchError(VerificationError):
    """A revealed update, nonce or metadata does not match its commitment."""


class ReceiptError(VerificationError):
    """The parts of a receipt do not bind together (round, galaxy or client differ)."""

"""Layer 1: integrity of a revealed update.

Checked in this order, each failure a typed :class:`IntegrityError` with a reason
code (the services count rejections by it):

``too_large``
    the body exceeds the size limit (checked before anything else is done with it);
``commitment_mismatch``
    the body and nonce do not hash to the committed digest (one streaming pass over
    the body as received);
``malformed``
    the body is not a canonical ``PGT1`` encoding;
``shape`` / ``dtype``
    tensor names, shapes or dtypes differ from the model's;
``non_finite``
    NaN or Inf values.

Signature and round binding are checked when the commitment is accepted (see
:mod:`protogalaxy.protocol.galaxy`), so a reveal can only follow a valid, signed
commitment of this round.
"""

from __future__ import annotations

import hmac

import torch

from protogalaxy.codec import decode_update
from protogalaxy.crypto.commitment import Commitment
from protogalaxy.spec import UpdateSpec

__all__ = ["IntegrityError", "check_reveal"]

REASONS = (
    "too_large",
    "commitment_mismatch",
    "malformed",
    "shape",
    "dtype",
    "non_finite",
    "bad_signature",
    "wrong_round",
    "unknown_client",
    "duplicate",
)


class IntegrityError(ValueError):
    """A layer-1 rejection, with a machine-readable ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown integrity reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


def check_reveal(
    commitment: Commitment,
    body: bytes | memoryview,
    *,
    digest: bytes,
    spec: UpdateSpec,
    max_bytes: int,
) -> dict[str, torch.Tensor]:
    """Check a reveal against its commitment and the model; return its tensors.

    ``digest`` is the reveal's recomputed commitment digest
    (:func:`~protogalaxy.crypto.identity.reveal_digest`, computed once for the
    reveal signature, so the body is hashed only once). The tensors returned are
    read-only views of ``body``: copy them before changing them.
    """
    if len(body) > max_bytes:
        raise IntegrityError(
            "too_large", f"{len(body)} bytes exceeds the limit of {max_bytes}"
        )
    if not hmac.compare_digest(digest, commitment.digest):
        raise IntegrityError(
            "commitment_mismatch",
            "the revealed update and nonce do not match the commitment digest",
        )
    try:
        tensors = decode_update(body, max_bytes=max_bytes, copy=False)
    except ValueError as exc:
        raise IntegrityError("malformed", str(exc)) from None
    try:
        spec.check(tensors)
    except ValueError as exc:
        reason, _, detail = str(exc).partition(": ")
        raise IntegrityError(reason, detail) from None
    return tensors

"""Commitments to model updates (commit-then-reveal).

A client commits to its update before anyone sees it:

``digest = SHA-256(b"PGD1" || u64 client_id || u64 galaxy_id || u64 round
|| u64 timestamp_ms || nonce[32] || PGT1-encoding(update))``

computed in one streaming pass over the tensor bytes. The public
:class:`Commitment` (the Merkle leaf data of the galaxy tree) is

``b"PGC1" || u64 client_id || u64 galaxy_id || u64 round || u64 timestamp_ms
|| digest[32]``  (68 bytes)

The 32-byte random nonce keeps the commitment hiding until the reveal (the leaf does
not contain it, and the update cannot be guessed and checked against the digest);
SHA-256 makes it binding. At reveal time the client sends the update and the nonce,
and :func:`verify_reveal` recomputes the digest. The full specification with a worked
example is ``docs/commitment-encoding.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from protogalaxy.codec import iter_encoded_chunks
from protogalaxy.crypto._checks import check_bytes, check_u64
from protogalaxy.crypto.errors import CommitmentMismatchError
from protogalaxy.crypto.merkle import HASH_SIZE, hash_leaf

__all__ = [
    "COMMITMENT_SIZE",
    "NONCE_SIZE",
    "Commitment",
    "commit",
    "update_digest",
    "update_hasher",
    "verify_reveal",
]

NONCE_SIZE: Final = 32
_DIGEST_MAGIC: Final = b"PGD1"
_LEAF_MAGIC: Final = b"PGC1"
_META: Final = struct.Struct("<QQQQ")
COMMITMENT_SIZE: Final = len(_LEAF_MAGIC) + _META.size + HASH_SIZE


def update_hasher(
    *, client_id: int, galaxy_id: int, round: int, timestamp_ms: int, nonce: bytes
) -> hashlib._Hash:
    """A SHA-256 state primed with the digest's prefix: feed it the ``PGT1`` bytes of
    the update (in any chunking) and its ``digest()`` is :func:`update_digest`.

    A receiver feeds it each chunk of a request body as the chunk arrives.
    """
    return hashlib.sha256(
        _DIGEST_MAGIC
        + _META.pack(
            check_u64("client_id", client_id),
            check_u64("galaxy_id", galaxy_id),
            check_u64("round", round),
            check_u64("timestamp_ms", timestamp_ms),
        )
        + check_bytes("nonce", nonce, NONCE_SIZE)
    )


def update_digest(
    update: Mapping[str, object] | Iterable[bytes | memoryview],
    *,
    client_id: int,
    galaxy_id: int,
    round: int,
    timestamp_ms: int,
    nonce: bytes,
) -> bytes:
    """The commitment digest of an update, in one pass over its bytes.

    ``update`` is either a mapping of tensor name to tensor, or the already encoded
    ``PGT1`` bytes as an iterable of chunks (for example ``[body]`` of an HTTP
    request), so a receiver hashes what it received without re-encoding.
    """
    h = update_hasher(
        client_id=client_id,
        galaxy_id=galaxy_id,
        round=round,
        timestamp_ms=timestamp_ms,
        nonce=nonce,
    )
    chunks = iter_encoded_chunks(update) if isinstance(update, Mapping) else update
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


@dataclass(frozen=True, slots=True)
class Commitment:
    """The public commitment of one client to one update in one round: the leaf data
    of its galaxy's Merkle tree."""

    client_id: int
    galaxy_id: int
    round: int
    timestamp_ms: int
    digest: bytes

    def __post_init__(self) -> None:
        check_u64("client_id", self.client_id)
        check_u64("galaxy_id", self.galaxy_id)
        check_u64("round", self.round)
        check_u64("timestamp_ms", self.timestamp_ms)
        object.__setattr__(
            self, "digest", check_bytes("digest", self.digest, HASH_SIZE)
        )

    def to_bytes(self) -> bytes:
        """The canonical 68-byte leaf data."""
        return (
            _LEAF_MAGIC
            + _META.pack(self.client_id, self.galaxy_id, self.round, self.timestamp_ms)
            + self.digest
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Commitment:
        data = bytes(data)
        if len(data) != COMMITMENT_SIZE:
            raise ValueError(
                f"commitment: {len(data)} bytes, expected {COMMITMENT_SIZE}"
            )
        if data[:4] != _LEAF_MAGIC:
            raise ValueError(f"commitment: bad magic (expected {_LEAF_MAGIC!r})")
        client_id, galaxy_id, rnd, ts = _META.unpack_from(data, 4)
        return cls(client_id, galaxy_id, rnd, ts, data[4 + _META.size :])

    @property
    def leaf_hash(self) -> bytes:
        """``SHA-256(0x00 || to_bytes())``: the hash of this leaf in the galaxy tree."""
        return hash_leaf(self.to_bytes())

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "galaxy_id": self.galaxy_id,
            "round": self.round,
            "timestamp_ms": self.timestamp_ms,
            "digest": self.digest.hex(),
        }

    @classmethod
    def from_dict(cls, obj: object) -> Commitment:
        keys = {"client_id", "galaxy_id", "round", "timestamp_ms", "digest"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ValueError(f"commitment: expected an object with keys {sorted(keys)}")
        digest = obj["digest"]
        if not isinstance(digest, str):
            raise ValueError("commitment: digest must be a hex string")
        try:
            return cls(
                obj["client_id"],
                obj["galaxy_id"],
                obj["round"],
                obj["timestamp_ms"],
                bytes.fromhex(digest),
            )
        except TypeError as exc:
            raise ValueError(f"commitment: {exc}") from None


def commit(
    update: Mapping[str, object],
    *,
    client_id: int,
    galaxy_id: int,
    round: int,
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> tuple[Commitment, bytes]:
    """Commit to ``update``; return the public commitment and the secret nonce.

    ``timestamp_ms`` defaults to now (Unix milliseconds) and ``nonce`` to 32 bytes
    from :func:`secrets.token_bytes`. Keep the nonce until the reveal.
    """
    if not isinstance(update, Mapping):
        raise TypeError(
            f"update must be a mapping of name to tensor, got {type(update).__name__}"
        )
    ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
    nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
    digest = update_digest(
        update,
        client_id=client_id,
        galaxy_id=galaxy_id,
        round=round,
        timestamp_ms=ts,
        nonce=nonce,
    )
    return Commitment(client_id, galaxy_id, round, ts, digest), nonce


def verify_reveal(
    commitment: Commitment,
    update: Mapping[str, object] | Iterable[bytes | memoryview],
    nonce: bytes,
) -> None:
    """Check a revealed update and nonce against ``commitment``.

    Raises
    ------
    CommitmentMismatchError
        If the digest of the revealed update differs from the committed one.
    """
    if not isinstance(commitment, Commitment):
        raise TypeError(
            f"commitment must be a Commitment, got {type(commitment).__name__}"
        )
    try:
        digest = update_digest(
            update,
            client_id=commitment.client_id,
            galaxy_id=commitment.galaxy_id,
            round=commitment.round,
            timestamp_ms=commitment.timestamp_ms,
            nonce=nonce,
        )
    except (TypeError, ValueError) as exc:
        raise CommitmentMismatchError(
            f"revealed update cannot be hashed: {exc}"
        ) from None
    if not hmac.compare_digest(digest, commitment.digest):
        raise CommitmentMismatchError(
            f"revealed update of client {commitment.client_id} in round "
            f"{commitment.round} "
            "does not match its commitment"
        )

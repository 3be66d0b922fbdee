"""Ed25519 identities (RFC 8032, via pyca/cryptography).

Keys serialize as their raw 32 bytes. Every signed message starts with a domain tag
and the run it belongs to,
``b"protogalaxy/v1/<kind>\\x00" || u8 len(run) || run || message``, so a signature
over one kind of object can never pass as a signature over another, and nothing
signed in one run (a head, a commitment, a galaxy's root) can be replayed in another.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections import OrderedDict
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protogalaxy.crypto._checks import check_bytes, check_run_id, check_u64
from protogalaxy.crypto.commitment import Commitment, update_hasher
from protogalaxy.crypto.errors import SignatureError

__all__ = [
    "KEY_SIZE",
    "SIGNATURE_SIZE",
    "SigningKey",
    "VerifyKey",
    "derive_signing_key",
    "domain_message",
    "registration_message",
    "reveal_digest",
    "reveal_hasher",
    "reveal_message",
    "sign_commitment",
    "sign_registration",
    "sign_reveal",
    "verify_commitment_signature",
    "verify_registration",
    "verify_reveal_signature",
]

KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
_DOMAINS: Final = frozenset(
    {
        "commitment",
        "round-head",
        "reveal",
        "log-head",
        "aggregate",
        "galaxy-root",
        "abstention",
        "registration",
        "model",
        "acknowledgement",
        "transcript",
        "round-record",
        "assignment",
        "evidence",
        "server-update",
    }
)


def domain_message(domain: str, message: bytes, *, run: str) -> bytes:
    """``b"protogalaxy/v1/" + domain + b"\\x00" + u8 len(run) + run + message``:
    what is actually signed."""
    if domain not in _DOMAINS:
        raise ValueError(f"domain must be one of {sorted(_DOMAINS)}, got {domain!r}")
    tag = check_run_id(run).encode()
    return (
        b"protogalaxy/v1/"
        + domain.encode()
        + b"\x00"
        + bytes([len(tag)])
        + tag
        + bytes(message)
    )


#: Signatures that verified, by SHA-256 of (key, signature, signed bytes): a pure
#: function's result remembered, so the same signed head checked by 1,000 clients
#: of one simulation, or a transcript a galaxy and its auditor both check in one
#: process, costs one Ed25519 verification. Only successes are kept (a failure is
#: recomputed and raised every time); bounded, least recently used dropped first.
_VERIFIED: OrderedDict[bytes, None] = OrderedDict()
_VERIFIED_MAX: Final = 1 << 14
_VERIFIED_LOCK = threading.Lock()


class VerifyKey:
    """An Ed25519 public key."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> VerifyKey:
        if not isinstance(raw, (bytes, bytearray)):
            raise TypeError(f"public key must be bytes, got {type(raw).__name__}")
        if len(raw) != KEY_SIZE:
            raise ValueError(f"public key must be {KEY_SIZE} bytes, got {len(raw)}")
        try:
            return cls(Ed25519PublicKey.from_public_bytes(bytes(raw)))
        except ValueError as exc:  # pragma: no cover - every 32-byte string parses
            raise ValueError(f"public key: {exc}") from None

    def to_bytes(self) -> bytes:
        return self._raw

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # by its raw bytes (a simulation's saved state, ``simulate --resume``)
        return (VerifyKey.from_bytes, (self._raw,))

    def verify(
        self, domain: str, message: bytes, signature: bytes, *, run: str
    ) -> None:
        """Verify ``signature`` over ``domain_message(domain, message, run=run)``.

        Raises
        ------
        SignatureError
            If the signature is malformed or does not verify.
        """
        if not isinstance(signature, (bytes, bytearray)):
            raise SignatureError(f"signature must be {SIGNATURE_SIZE} bytes")
        sig = bytes(signature)  # one copy: what is checked is what is remembered
        if len(sig) != SIGNATURE_SIZE:
            raise SignatureError(f"signature must be {SIGNATURE_SIZE} bytes")
        signed = domain_message(domain, message, run=run)
        memo = hashlib.sha256(self._raw + sig + signed).digest()
        with _VERIFIED_LOCK:
            if memo in _VERIFIED:
                _VERIFIED.move_to_end(memo)
                return
        try:
            self._key.verify(sig, signed)
        except InvalidSignature:
            raise SignatureError(f"{domain} signature does not verify") from None
        with _VERIFIED_LOCK:
            _VERIFIED[memo] = None
            if len(_VERIFIED) > _VERIFIED_MAX:
                _VERIFIED.popitem(last=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self._raw.hex()})"


class SigningKey:
    """An Ed25519 private key."""

    __slots__ = ("_key", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> SigningKey:
        """A key from its raw 32-byte seed."""
        if not isinstance(raw, (bytes, bytearray)):
            raise TypeError(f"private key must be bytes, got {type(raw).__name__}")
        if len(raw) != KEY_SIZE:
            raise ValueError(f"private key must be {KEY_SIZE} bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    def to_bytes(self) -> bytes:
        """The raw 32-byte seed. Keep it secret."""
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # by its seed: only a simulation's saved state (written 0600) holds one
        return (SigningKey.from_bytes, (self.to_bytes(),))

    def sign(self, domain: str, message: bytes, *, run: str) -> bytes:
        """Sign ``domain_message(domain, message, run=run)``; return the 64-byte
        signature."""
        return self._key.sign(domain_message(domain, message, run=run))

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_key.to_bytes().hex()})"


def derive_signing_key(seed: bytes, *, purpose: str, index: int) -> SigningKey:
    """The Ed25519 key number ``index`` for ``purpose`` derived from a secret
    ``seed``: ``HMAC-SHA256(seed, "protogalaxy/v1/key/" || purpose || 0x00 || u64
    index)`` as the private key's 32-byte seed.

    The chart's simulated clients use it (``purpose="client"``): a restarted pod
    derives the same key and re-registers under its id. Whoever holds ``seed``
    holds every key derived from it, so real deployments provision one key per
    client instead (see docs/services.md).
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 32:
        raise ValueError("seed must be at least 32 secret bytes")
    if not purpose or "\x00" in purpose:
        raise ValueError(f"purpose must be a non-empty name, got {purpose!r}")
    message = (
        b"protogalaxy/v1/key/"
        + purpose.encode()
        + b"\x00"
        + struct.pack("<Q", check_u64("index", index))
    )
    return SigningKey.from_bytes(hmac.digest(bytes(seed), message, "sha256"))


def registration_message(client_id: int, galaxy_id: int, public_key: bytes) -> bytes:
    """``"PGR1" || u64 client_id || u64 galaxy_id || public_key[32]``: what a client
    signs to enrol its key with its galaxy (proof that it holds the key)."""
    return (
        b"PGR1"
        + struct.pack(
            "<QQ",
            check_u64("client_id", client_id),
            check_u64("galaxy_id", galaxy_id),
        )
        + check_bytes("public_key", public_key, KEY_SIZE)
    )


def sign_registration(
    key: SigningKey, *, client_id: int, galaxy_id: int, run: str
) -> bytes:
    return key.sign(
        "registration",
        registration_message(client_id, galaxy_id, key.public_key.to_bytes()),
        run=run,
    )


def verify_registration(
    key: VerifyKey, signature: bytes, *, client_id: int, galaxy_id: int, run: str
) -> None:
    """Raise :class:`SignatureError` unless ``key`` signed its own registration as
    ``client_id`` of ``galaxy_id`` in ``run``."""
    key.verify(
        "registration",
        registration_message(client_id, galaxy_id, key.to_bytes()),
        signature,
        run=run,
    )


def sign_commitment(key: SigningKey, commitment: Commitment, *, run: str) -> bytes:
    """The client's signature over its commitment's leaf data, in ``run``."""
    return key.sign("commitment", commitment.to_bytes(), run=run)


def verify_commitment_signature(
    key: VerifyKey, commitment: Commitment, signature: bytes, *, run: str
) -> None:
    """Raise :class:`SignatureError` unless ``key`` signed ``commitment`` in
    ``run``."""
    key.verify("commitment", commitment.to_bytes(), signature, run=run)


def reveal_hasher(commitment: Commitment, nonce: bytes) -> hashlib._Hash:
    """A hash state that, fed a revealed body, gives :func:`reveal_digest`."""
    return update_hasher(
        client_id=commitment.client_id,
        galaxy_id=commitment.galaxy_id,
        round=commitment.round,
        timestamp_ms=commitment.timestamp_ms,
        nonce=nonce,
    )


def reveal_digest(
    commitment: Commitment, body: bytes | bytearray | memoryview, nonce: bytes
) -> bytes:
    """The commitment digest recomputed from a revealed ``body`` and ``nonce``, in the
    context (client, galaxy, round, time) of ``commitment``.

    It equals ``commitment.digest`` exactly when the reveal matches. A receiver
    computes it once, in one pass over the body (:func:`reveal_hasher` lets it hash
    while the body arrives), and uses it both for the reveal signature and for the
    match against the commitment.
    """
    h = reveal_hasher(commitment, nonce)
    h.update(body)
    return h.digest()


def reveal_message(commitment: Commitment, nonce: bytes, digest: bytes) -> bytes:
    """``commitment || nonce || digest``: what a client signs when it reveals, where
    ``digest`` is :func:`reveal_digest` of the body it sends.

    Signing the digest of the body actually sent makes a rejected reveal
    attributable: nobody but the client can make a reveal count against the
    client's reputation. The digest binds the body as tightly as a plain hash of it
    (it is SHA-256 over a fixed prefix and the body), and the receiver needs only
    one pass over the body for the signature and the commitment match together.
    """
    return commitment.to_bytes() + bytes(nonce) + bytes(digest)


def sign_reveal(
    key: SigningKey,
    commitment: Commitment,
    body: bytes | memoryview,
    nonce: bytes,
    *,
    run: str,
) -> bytes:
    digest = reveal_digest(commitment, body, nonce)
    return key.sign("reveal", reveal_message(commitment, nonce, digest), run=run)


def verify_reveal_signature(
    key: VerifyKey,
    commitment: Commitment,
    nonce: bytes,
    signature: bytes,
    *,
    digest: bytes,
    run: str,
) -> None:
    """Raise :class:`SignatureError` unless ``key`` signed, in ``run``, the reveal
    whose body has :func:`reveal_digest` ``digest``."""
    key.verify("reveal", reveal_message(commitment, nonce, digest), signature, run=run)

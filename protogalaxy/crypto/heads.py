"""Round heads: the global aggregator's signed statement of a round's global tree.

Encoding (68 bytes): ``b"PGH1" || u64 round || u64 tree_size || root[32] ||
u64 timestamp_ms || u64 reserved(0)``, signed under the domain ``round-head``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from protogalaxy.crypto._checks import check_bytes, check_u64
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.identity import KEY_SIZE, SIGNATURE_SIZE, SigningKey, VerifyKey

__all__ = ["RoundHead", "SignedRoundHead", "sign_round_head"]

_MAGIC: Final = b"PGH1"
_LAYOUT: Final = struct.Struct("<4sQQ32sQQ")
HEAD_SIZE: Final = _LAYOUT.size


@dataclass(frozen=True, slots=True)
class RoundHead:
    """``(round, tree_size, root, timestamp_ms)`` of one round's global tree."""

    round: int
    tree_size: int
    root: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        check_u64("round", self.round)
        check_u64("tree_size", self.tree_size, minimum=1)
        check_u64("timestamp_ms", self.timestamp_ms)
        object.__setattr__(self, "root", check_bytes("root", self.root, 32))

    def to_bytes(self) -> bytes:
        return _LAYOUT.pack(
            _MAGIC, self.round, self.tree_size, self.root, self.timestamp_ms, 0
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundHead:
        if len(data) != HEAD_SIZE:
            raise ValueError(f"round head: {len(data)} bytes, expected {HEAD_SIZE}")
        magic, rnd, size, root, ts, reserved = _LAYOUT.unpack(bytes(data))
        if magic != _MAGIC or reserved != 0:
            raise ValueError("round head: bad magic or non-zero reserved field")
        return cls(rnd, size, root, ts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "timestamp_ms": self.timestamp_ms,
        }

    @classmethod
    def from_dict(cls, obj: object) -> RoundHead:
        keys = {"round", "tree_size", "root", "timestamp_ms"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ValueError(f"round head: expected an object with keys {sorted(keys)}")
        if not isinstance(obj["root"], str):
            raise ValueError("round head: root must be a hex string")
        try:
            return cls(
                obj["round"],
                obj["tree_size"],
                bytes.fromhex(obj["root"]),
                obj["timestamp_ms"],
            )
        except TypeError as exc:
            raise ValueError(f"round head: {exc}") from None


@dataclass(frozen=True, slots=True)
class SignedRoundHead:
    """A round head with the global aggregator's public key and Ed25519 signature."""

    head: RoundHead
    signer: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.head, RoundHead):
            raise TypeError("head must be a RoundHead")
        if (
            not isinstance(self.signer, (bytes, bytearray))
            or len(self.signer) != KEY_SIZE
        ):
            raise ValueError(f"signer must be a {KEY_SIZE}-byte public key")
        if (
            not isinstance(self.signature, (bytes, bytearray))
            or len(self.signature) != SIGNATURE_SIZE
        ):
            raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes")

    def verify(self, key: VerifyKey) -> None:
        """Verify against the trusted ``key`` (never against ``self.signer`` alone).

        Raises
        ------
        SignatureError
            If the head was signed by another key or the signature does not verify.
        """
        if self.signer != key.to_bytes():
            raise SignatureError(
                "round head is signed by another key than the trusted one"
            )
        key.verify("round-head", self.head.to_bytes(), self.signature)

    def to_bytes(self) -> bytes:
        return self.head.to_bytes() + bytes(self.signer) + bytes(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRoundHead:
        data = bytes(data)
        size = HEAD_SIZE + KEY_SIZE + SIGNATURE_SIZE
        if len(data) != size:
            raise ValueError(f"signed round head: {len(data)} bytes, expected {size}")
        return cls(
            RoundHead.from_bytes(data[:HEAD_SIZE]),
            data[HEAD_SIZE : HEAD_SIZE + KEY_SIZE],
            data[HEAD_SIZE + KEY_SIZE :],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.to_dict(),
            "signer": bytes(self.signer).hex(),
            "signature": bytes(self.signature).hex(),
        }

    @classmethod
    def from_dict(cls, obj: object) -> SignedRoundHead:
        if not isinstance(obj, dict) or set(obj) != {"head", "signer", "signature"}:
            raise ValueError(
                "signed round head: expected an object with head, signer, signature"
            )
        if not isinstance(obj["signer"], str) or not isinstance(obj["signature"], str):
            raise ValueError(
                "signed round head: signer and signature must be hex strings"
            )
        return cls(
            RoundHead.from_dict(obj["head"]),
            bytes.fromhex(obj["signer"]),
            bytes.fromhex(obj["signature"]),
        )


def sign_round_head(key: SigningKey, head: RoundHead) -> SignedRoundHead:
    """Sign ``head`` with the global aggregator's key."""
    return SignedRoundHead(
        head, key.public_key.to_bytes(), key.sign("round-head", head.to_bytes())
    )

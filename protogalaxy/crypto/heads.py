"""Round heads: the global aggregator's signed statement of a round's global tree.

Encoding (61 bytes plus the run id): ``b"PGH2" || u64 round || u64 tree_size ||
root[32] || u64 timestamp_ms || u8 len(run) || run``, signed under the domain
``round-head`` of that same run. A head names its run, so a head of one run can
never pass as one of another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from protogalaxy.crypto._checks import check_bytes, check_run_id, check_u64
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.identity import KEY_SIZE, SIGNATURE_SIZE, SigningKey, VerifyKey

__all__ = ["RoundHead", "SignedRoundHead", "sign_round_head"]

_MAGIC: Final = b"PGH2"
_LAYOUT: Final = struct.Struct("<4sQQ32sQB")


@dataclass(frozen=True, slots=True)
class RoundHead:
    """``(run, round, tree_size, root, timestamp_ms)`` of one round's global tree."""

    round: int
    tree_size: int
    root: bytes
    timestamp_ms: int
    run: str

    def __post_init__(self) -> None:
        check_u64("round", self.round)
        check_u64("tree_size", self.tree_size, minimum=1)
        check_u64("timestamp_ms", self.timestamp_ms)
        object.__setattr__(self, "root", check_bytes("root", self.root, 32))
        check_run_id(self.run)

    def to_bytes(self) -> bytes:
        run = self.run.encode()
        return (
            _LAYOUT.pack(
                _MAGIC,
                self.round,
                self.tree_size,
                self.root,
                self.timestamp_ms,
                len(run),
            )
            + run
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundHead:
        data = bytes(data)
        if len(data) < _LAYOUT.size:
            raise ValueError(f"round head: {len(data)} bytes, too short")
        magic, rnd, size, root, ts, run_len = _LAYOUT.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("round head: bad magic")
        if len(data) != _LAYOUT.size + run_len:
            raise ValueError(
                f"round head: {len(data)} bytes, expected {_LAYOUT.size + run_len}"
            )
        try:
            run = data[_LAYOUT.size :].decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("round head: the run id is not ASCII") from None
        return cls(rnd, size, root, ts, run)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "round": self.round,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "timestamp_ms": self.timestamp_ms,
        }

    @classmethod
    def from_dict(cls, obj: object) -> RoundHead:
        keys = {"run", "round", "tree_size", "root", "timestamp_ms"}
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
                obj["run"],
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

    def verify(self, key: VerifyKey, *, run: str) -> None:
        """Verify against the trusted ``key`` (never against ``self.signer`` alone)
        as a head of ``run``.

        Raises
        ------
        SignatureError
            If the head is of another run, was signed by another key, or the
            signature does not verify.
        """
        if self.head.run != run:
            raise SignatureError(
                f"round head is for run {self.head.run!r}, expected run {run!r}"
            )
        if self.signer != key.to_bytes():
            raise SignatureError(
                "round head is signed by another key than the trusted one"
            )
        key.verify("round-head", self.head.to_bytes(), self.signature, run=run)

    def to_bytes(self) -> bytes:
        return self.head.to_bytes() + bytes(self.signer) + bytes(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRoundHead:
        data = bytes(data)
        tail = KEY_SIZE + SIGNATURE_SIZE
        if len(data) <= tail:
            raise ValueError(f"signed round head: {len(data)} bytes, too short")
        return cls(
            RoundHead.from_bytes(data[:-tail]),
            data[-tail:-SIGNATURE_SIZE],
            data[-SIGNATURE_SIZE:],
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
    """Sign ``head`` with the global aggregator's key, in the head's run."""
    return SignedRoundHead(
        head,
        key.public_key.to_bytes(),
        key.sign("round-head", head.to_bytes(), run=head.run),
    )

"""What a galaxy aggregator says to the global aggregator, signed with its own key,
and what the global aggregator says of the model it publishes.

Each statement has a fixed little-endian layout and a signing domain; a galaxy signs
``domain_message(domain, statement bytes, run=run)`` with its provisioned Ed25519 key,
and the global aggregator checks it against that galaxy's public key, so no one but
galaxy ``g`` (not another galaxy, not a holder of a transport token) can speak for
``g``:

=================== =============== ===================================================
statement           domain          bytes
=================== =============== ===================================================
root                galaxy-root     the galaxy leaf: ``"PGG1" || u64 round ||
                                    u64 galaxy_id || u64 tree_size || root[32]``
abstention          abstention      ``"PGB1" || u64 round || u64 galaxy_id``
aggregate           aggregate       ``"PGA2" || u64 round || u64 galaxy_id ||
                                    u64 tree_size || root[32] || u64 weight ||
                                    digest[32] || transcript[32]``
acknowledgement     acknowledgement ``"PGK1" || u64 round || u64 galaxy_id ||
                                    u64 client_id || commitment[68] || digest[32]``
=================== =============== ===================================================

The global aggregator signs each model version it publishes (kind ``model``:
``"PGM1" || u64 version || sha256(PGT1 body)[32]``), so a client that fetches the
model through any galaxy can check it is the global model of that round.

An aggregate statement binds the aggregate to the root the galaxy committed to, its
weight (the number of updates it aggregated, ``1 <= weight <= tree_size``) and the
digest of the round's signed transcript; ``digest`` is the SHA-256 of the
aggregate's float32 little-endian values (:func:`aggregate_digest`). An
acknowledgement is the galaxy's receipt for an accepted reveal: with it a client can
prove that its update was taken, whatever the galaxy says later.

Larger statements are JSON documents (:class:`SignedDocument`): the signature is
over the SHA-256 of the document's canonical JSON (:func:`canonical_json`), under
the document's kind (transcripts, round records, assignments, evidence).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from protogalaxy.crypto._checks import check_bytes, check_u64, unhex
from protogalaxy.crypto.commitment import COMMITMENT_SIZE
from protogalaxy.crypto.identity import SIGNATURE_SIZE, SigningKey, VerifyKey
from protogalaxy.crypto.trees import GalaxyLeaf

__all__ = [
    "Abstention",
    "Acknowledgement",
    "AggregateStatement",
    "ModelStatement",
    "Signed",
    "SignedDocument",
    "aggregate_digest",
    "canonical_json",
    "sign_document",
    "sign_inline",
    "sign_statement",
    "verify_inline",
]

_ABSTENTION: Final = struct.Struct("<4sQQ")
_AGGREGATE: Final = struct.Struct("<4sQQQ32sQ32s32s")
_MODEL: Final = struct.Struct("<4sQ32s")
_ACK: Final = struct.Struct(f"<4sQQQ{COMMITMENT_SIZE}s32s")
_DOCUMENT_KINDS: Final = frozenset(
    {
        "transcript",
        "round-record",
        "assignment",
        "evidence",
        "log-head",
        "server-update",
    }
)


def aggregate_digest(values: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of an aggregate's float32 little-endian values."""
    return hashlib.sha256(values).digest()


def canonical_json(obj: Any) -> bytes:
    """The one encoding of a JSON document that is signed and hashed: sorted keys,
    no whitespace, ASCII only, no NaN or infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _keys(obj: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise ValueError(f"{what}: expected an object with keys {sorted(keys)}")
    return obj


@dataclass(frozen=True, slots=True)
class Abstention:
    """Galaxy ``galaxy_id`` had no commitments in ``round``: the round need not wait
    for its root."""

    round: int
    galaxy_id: int

    def __post_init__(self) -> None:
        check_u64("round", self.round)
        check_u64("galaxy_id", self.galaxy_id)

    def to_bytes(self) -> bytes:
        return _ABSTENTION.pack(b"PGB1", self.round, self.galaxy_id)

    @classmethod
    def from_bytes(cls, data: bytes) -> Abstention:
        if len(data) != _ABSTENTION.size:
            raise ValueError(f"abstention: {len(data)} bytes, expected 20")
        magic, rnd, gid = _ABSTENTION.unpack(bytes(data))
        if magic != b"PGB1":
            raise ValueError("abstention: bad magic")
        return cls(rnd, gid)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "galaxy_id": self.galaxy_id}

    @classmethod
    def from_dict(cls, obj: object) -> Abstention:
        d = _keys(obj, {"round", "galaxy_id"}, "abstention")
        return cls(d["round"], d["galaxy_id"])


@dataclass(frozen=True, slots=True)
class AggregateStatement:
    """Galaxy ``galaxy_id``'s aggregate of ``round``: bound to the root and tree size
    it committed to, with the number of updates it aggregated (``weight``) and the
    digest of the aggregate's values."""

    round: int
    galaxy_id: int
    tree_size: int
    root: bytes
    weight: int
    digest: bytes
    #: digest of the galaxy's signed transcript of the round
    transcript: bytes

    def __post_init__(self) -> None:
        check_u64("round", self.round)
        check_u64("galaxy_id", self.galaxy_id)
        check_u64("tree_size", self.tree_size, minimum=1)
        check_u64("weight", self.weight, minimum=1)
        if self.weight > self.tree_size:
            raise ValueError(
                f"weight {self.weight} exceeds the tree size {self.tree_size}: a "
                "galaxy cannot aggregate more updates than it committed to"
            )
        object.__setattr__(self, "root", check_bytes("root", self.root, 32))
        object.__setattr__(self, "digest", check_bytes("digest", self.digest, 32))
        object.__setattr__(
            self, "transcript", check_bytes("transcript", self.transcript, 32)
        )

    def to_bytes(self) -> bytes:
        return _AGGREGATE.pack(
            b"PGA2",
            self.round,
            self.galaxy_id,
            self.tree_size,
            self.root,
            self.weight,
            self.digest,
            self.transcript,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AggregateStatement:
        if len(data) != _AGGREGATE.size:
            raise ValueError(
                f"aggregate statement: {len(data)} bytes, expected {_AGGREGATE.size}"
            )
        magic, rnd, gid, size, root, weight, digest, transcript = _AGGREGATE.unpack(
            bytes(data)
        )
        if magic != b"PGA2":
            raise ValueError("aggregate statement: bad magic")
        return cls(rnd, gid, size, root, weight, digest, transcript)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "galaxy_id": self.galaxy_id,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "weight": self.weight,
            "digest": self.digest.hex(),
            "transcript": self.transcript.hex(),
        }

    @classmethod
    def from_dict(cls, obj: object) -> AggregateStatement:
        what = "aggregate statement"
        d = _keys(
            obj,
            {
                "round",
                "galaxy_id",
                "tree_size",
                "root",
                "weight",
                "digest",
                "transcript",
            },
            what,
        )
        return cls(
            d["round"],
            d["galaxy_id"],
            d["tree_size"],
            unhex(d["root"], f"{what} root"),
            d["weight"],
            unhex(d["digest"], f"{what} digest"),
            unhex(d["transcript"], f"{what} transcript"),
        )


@dataclass(frozen=True, slots=True)
class ModelStatement:
    """The global model of ``version`` (the round it is trained in) has ``digest``,
    the SHA-256 of its ``PGT1`` encoding."""

    version: int
    digest: bytes

    def __post_init__(self) -> None:
        check_u64("version", self.version)
        object.__setattr__(self, "digest", check_bytes("digest", self.digest, 32))

    @classmethod
    def of(cls, version: int, body: bytes | memoryview) -> ModelStatement:
        return cls(version, hashlib.sha256(body).digest())

    def to_bytes(self) -> bytes:
        return _MODEL.pack(b"PGM1", self.version, self.digest)

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelStatement:
        if len(data) != _MODEL.size:
            raise ValueError(f"model statement: {len(data)} bytes, expected 44")
        magic, version, digest = _MODEL.unpack(bytes(data))
        if magic != b"PGM1":
            raise ValueError("model statement: bad magic")
        return cls(version, digest)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest.hex()}

    @classmethod
    def from_dict(cls, obj: object) -> ModelStatement:
        d = _keys(obj, {"version", "digest"}, "model statement")
        return cls(d["version"], unhex(d["digest"], "model statement digest"))


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """Galaxy ``galaxy_id`` accepted client ``client_id``'s reveal in ``round``: the
    reveal of ``commitment`` whose recomputed digest is ``digest``."""

    round: int
    galaxy_id: int
    client_id: int
    commitment: bytes
    digest: bytes

    def __post_init__(self) -> None:
        check_u64("round", self.round)
        check_u64("galaxy_id", self.galaxy_id)
        check_u64("client_id", self.client_id)
        object.__setattr__(
            self,
            "commitment",
            check_bytes("commitment", self.commitment, COMMITMENT_SIZE),
        )
        object.__setattr__(self, "digest", check_bytes("digest", self.digest, 32))

    def to_bytes(self) -> bytes:
        return _ACK.pack(
            b"PGK1",
            self.round,
            self.galaxy_id,
            self.client_id,
            self.commitment,
            self.digest,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Acknowledgement:
        if len(data) != _ACK.size:
            raise ValueError(
                f"acknowledgement: {len(data)} bytes, expected {_ACK.size}"
            )
        magic, rnd, gid, cid, commitment, digest = _ACK.unpack(bytes(data))
        if magic != b"PGK1":
            raise ValueError("acknowledgement: bad magic")
        return cls(rnd, gid, cid, commitment, digest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "galaxy_id": self.galaxy_id,
            "client_id": self.client_id,
            "commitment": self.commitment.hex(),
            "digest": self.digest.hex(),
        }

    @classmethod
    def from_dict(cls, obj: object) -> Acknowledgement:
        what = "acknowledgement"
        d = _keys(
            obj, {"round", "galaxy_id", "client_id", "commitment", "digest"}, what
        )
        return cls(
            d["round"],
            d["galaxy_id"],
            d["client_id"],
            unhex(d["commitment"], f"{what} commitment"),
            unhex(d["digest"], f"{what} digest"),
        )


S = TypeVar(
    "S", GalaxyLeaf, Abstention, AggregateStatement, ModelStatement, Acknowledgement
)

_DOMAINS: Final[dict[type, str]] = {
    GalaxyLeaf: "galaxy-root",
    Abstention: "abstention",
    AggregateStatement: "aggregate",
    ModelStatement: "model",
    Acknowledgement: "acknowledgement",
}


@dataclass(frozen=True, slots=True)
class Signed(Generic[S]):
    """A galaxy statement with the galaxy's Ed25519 signature over it."""

    statement: S
    signature: bytes

    def __post_init__(self) -> None:
        if type(self.statement) not in _DOMAINS:
            raise TypeError(f"not a galaxy statement: {type(self.statement).__name__}")
        object.__setattr__(
            self, "signature", check_bytes("signature", self.signature, SIGNATURE_SIZE)
        )

    @property
    def domain(self) -> str:
        return _DOMAINS[type(self.statement)]

    def verify(self, key: VerifyKey, *, run: str) -> None:
        """Raise :class:`~protogalaxy.crypto.errors.SignatureError` unless ``key``
        (the trusted key of the galaxy the statement names) signed it in ``run``."""
        key.verify(self.domain, self.statement.to_bytes(), self.signature, run=run)

    def to_dict(self) -> dict[str, Any]:
        return {
            "statement": self.statement.to_dict(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, kind: type[S], obj: object) -> Signed[S]:
        what = f"signed {kind.__name__}"
        d = _keys(obj, {"statement", "signature"}, what)
        try:
            statement = kind.from_dict(d["statement"])
        except TypeError as exc:  # a field of the wrong JSON type ("0", null, true)
            raise ValueError(f"{what}: {exc}") from None
        return cls(statement, unhex(d["signature"], f"{what} signature"))


def sign_statement(key: SigningKey, statement: S, *, run: str) -> Signed[S]:
    """``statement`` signed with a galaxy's ``key`` in ``run``."""
    domain = _DOMAINS[type(statement)]
    return Signed(statement, key.sign(domain, statement.to_bytes(), run=run))


@dataclass(frozen=True)
class SignedDocument:
    """A JSON document one party signed: the signature is over the SHA-256 of the
    document's :func:`canonical_json`, under the domain ``kind`` and the run."""

    kind: str
    body: dict[str, Any]
    signature: bytes

    def __post_init__(self) -> None:
        if self.kind not in _DOCUMENT_KINDS:
            raise ValueError(f"kind must be one of {sorted(_DOCUMENT_KINDS)}")
        if not isinstance(self.body, dict):
            raise ValueError(f"signed {self.kind}: the body must be a JSON object")
        object.__setattr__(
            self, "signature", check_bytes("signature", self.signature, SIGNATURE_SIZE)
        )

    def digest(self) -> bytes:
        """SHA-256 of the body's canonical JSON: what is signed, and what other
        statements bind to."""
        return hashlib.sha256(canonical_json(self.body)).digest()

    def verify(self, key: VerifyKey, *, run: str) -> None:
        """Raise :class:`~protogalaxy.crypto.errors.SignatureError` unless ``key``
        signed this document in ``run``."""
        key.verify(self.kind, self.digest(), self.signature, run=run)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "body": copy.deepcopy(self.body),
            "signature": self.signature.hex(),
        }

    def to_bytes(self) -> bytes:
        # Serialized as it stands: no copy of the body is needed to encode it.
        return canonical_json(
            {"kind": self.kind, "body": self.body, "signature": self.signature.hex()}
        )

    @classmethod
    def from_dict(cls, obj: object, *, kind: str | None = None) -> SignedDocument:
        d = _keys(obj, {"kind", "body", "signature"}, "signed document")
        if kind is not None and d["kind"] != kind:
            raise ValueError(f"expected a signed {kind}, got a {d['kind']!r}")
        return cls(
            d["kind"], copy.deepcopy(d["body"]), unhex(d["signature"], "signature")
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, kind: str | None = None) -> SignedDocument:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"signed document: malformed JSON ({exc})") from None
        # The parsed object is this call's own: take its body without a copy.
        d = _keys(obj, {"kind", "body", "signature"}, "signed document")
        if kind is not None and d["kind"] != kind:
            raise ValueError(f"expected a signed {kind}, got a {d['kind']!r}")
        return cls(d["kind"], d["body"], unhex(d["signature"], "signature"))


def sign_document(
    key: SigningKey, kind: str, body: dict[str, Any], *, run: str
) -> SignedDocument:
    """``body`` signed with ``key`` as a document of ``kind`` in ``run``."""
    digest = hashlib.sha256(canonical_json(body)).digest()
    return SignedDocument(kind, copy.deepcopy(body), key.sign(kind, digest, run=run))


def sign_inline(
    key: SigningKey, kind: str, body: dict[str, Any], *, run: str
) -> dict[str, Any]:
    """``body`` with a ``signature`` field added: ``key``'s signature over the
    SHA-256 of the canonical JSON of ``body`` (without that field), under ``kind``.
    For records that are read as they are (evidence in logs and files)."""
    if "signature" in body:
        raise ValueError("the body already has a signature field")
    signed = sign_document(key, kind, body, run=run)
    return {**copy.deepcopy(body), "signature": signed.signature.hex()}


def verify_inline(
    key: VerifyKey, kind: str, record: dict[str, Any], *, run: str
) -> None:
    """Raise :class:`~protogalaxy.crypto.errors.SignatureError` (or ``ValueError``
    for a record without a signature) unless ``key`` signed ``record``."""
    if not isinstance(record, dict) or not isinstance(record.get("signature"), str):
        raise ValueError(f"{kind} record: no signature")
    body = {k: v for k, v in record.items() if k != "signature"}
    SignedDocument(kind, body, unhex(record["signature"], "signature")).verify(
        key, run=run
    )

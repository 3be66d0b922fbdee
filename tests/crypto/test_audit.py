"""The audit log of round records: append-only, persistent, consistent between any
two sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from protogalaxy.crypto.audit import AuditLog, LogHead, verify_log_extension
from protogalaxy.crypto.errors import ProofError, SignatureError
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.statements import SignedDocument, sign_document

RUN = "r1"


def heads(
    key: SigningKey, n: int, start: int = 0, run: str = RUN
) -> list[SignedDocument]:
    """Signed round records of rounds ``start .. start + n - 1``."""
    return [
        sign_document(
            key,
            "round-record",
            {"run": run, "round": r, "model": bytes([r % 256]).hex() * 32},
            run=run,
        )
        for r in range(start, start + n)
    ]


def test_consistency_between_any_two_sizes() -> None:
    key = SigningKey.generate()
    log = AuditLog(trusted_key=key.public_key, run=RUN)
    snapshots = []
    for h in heads(key, 12):
        log.append(h)
        snapshots.append(log.head())
    for i, old in enumerate(snapshots):
        for new in snapshots[i:]:
            verify_log_extension(old, new, log.consistency_proof(old.size, new.size))


def test_rewritten_history_is_detected() -> None:
    key = SigningKey.generate()
    honest = AuditLog()
    for h in heads(key, 6):
        honest.append(h)
    seen = honest.head(4)
    rewritten = AuditLog()
    hs = heads(key, 6)
    hs[2] = sign_document(
        key, "round-record", {"run": RUN, "round": 2, "model": "ee" * 32}, run=RUN
    )
    for h in hs:
        rewritten.append(h)
    for old_size in (3, 4):
        with pytest.raises(ProofError):
            verify_log_extension(
                honest.head(old_size),
                rewritten.head(),
                rewritten.consistency_proof(old_size),
            )
    verify_log_extension(seen, honest.head(), honest.consistency_proof(4))


def test_rounds_must_increase_and_keys_must_match() -> None:
    key = SigningKey.generate()
    log = AuditLog(trusted_key=key.public_key, run=RUN)
    a, b = heads(key, 2)
    log.append(b)
    with pytest.raises(ValueError, match="does not follow"):
        log.append(a)
    with pytest.raises(SignatureError):
        log.append(heads(SigningKey.generate(), 1, start=5)[0])
    # A head the right key signed for another run is not this log's.
    with pytest.raises(ValueError, match="run"):
        log.append(heads(key, 1, start=5, run="r2")[0])
    with pytest.raises(ValueError, match="run"):
        AuditLog(trusted_key=key.public_key)
    assert log.size == 1


def test_persistence_and_torn_tail(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "audit.log"
    log = AuditLog(path, trusted_key=key.public_key, run=RUN)
    for h in heads(key, 5):
        log.append(h)
    root = log.root
    reopened = AuditLog(path, trusted_key=key.public_key, run=RUN)
    assert reopened.root == root and reopened.size == 5
    assert reopened.entry(4) == log.entry(4)
    assert path.read_bytes() == log.to_bytes()
    # A crash in the middle of an append leaves a torn record at the end.
    with open(path, "ab") as f:
        f.write(b"\xa4\x00\x00\x00" + b"partial")  # claims 164 bytes, has 7
    recovered = AuditLog(path, trusted_key=key.public_key, run=RUN)
    assert recovered.size == 5 and recovered.root == root
    assert path.read_bytes() == log.to_bytes()
    recovered.append(heads(key, 1, start=5)[0])
    assert AuditLog(path).size == 6


def test_corruption_is_an_error(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for h in heads(key, 3):
        log.append(h)
    data = bytearray(path.read_bytes())
    data[9] ^= 0xFF  # inside the first record's magic
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt record"):
        AuditLog(path)
    path.write_bytes(b"NOPE" + bytes(10))
    with pytest.raises(ValueError, match="magic"):
        AuditLog(path)
    # A record that fails the trusted key on load.
    good = tmp_path / "good.log"
    log2 = AuditLog(good)
    log2.append(heads(key, 1)[0])
    with pytest.raises(SignatureError):
        AuditLog(good, trusted_key=SigningKey.generate().public_key, run=RUN)


def test_inclusion_of_an_entry() -> None:
    from protogalaxy.crypto.merkle import verify_inclusion

    key = SigningKey.generate()
    log = AuditLog()
    for h in heads(key, 9):
        log.append(h)
    head: LogHead = log.head()
    for i in range(9):
        verify_inclusion(log.entry(i).to_bytes(), log.inclusion_proof(i), head.root)

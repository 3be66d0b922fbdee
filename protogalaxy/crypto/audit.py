"""The audit log: every round's signed record, as an append-only RFC 9162 Merkle log.

Leaf ``i`` is the ``i``-th round record, a :class:`SignedDocument` of kind
``round-record`` signed by the global aggregator (its canonical JSON bytes): the
round's signed head, every galaxy's transcript and aggregate digests and fate, the
isolated galaxies and the digest of the model after the round. Rounds are strictly
increasing. Anyone holding an earlier log head ``(size, root)`` can check with a
consistency proof that a later head extends it, so history cannot be rewritten
unseen.

On disk (optional) the log is ``b"PGAL\\x02"`` followed by records
``u32 length || record bytes``; each append is flushed and fsynced before it
returns. A record torn by a crash at the very end is dropped on open (it was never
acknowledged); anything else that does not parse is an error.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protogalaxy.crypto.identity import VerifyKey
from protogalaxy.crypto.merkle import InclusionProof, MerkleTree, verify_consistency
from protogalaxy.crypto.statements import SignedDocument

__all__ = ["AuditLog", "LogHead", "record_round", "verify_log_extension"]

_log = logging.getLogger(__name__)
_FILE_MAGIC: Final = b"PGAL\x02"
_KIND: Final = "round-record"
_LEN: Final = struct.Struct("<I")
_MAX_RECORD: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class LogHead:
    """The audit log's size and root at one moment."""

    size: int
    root: bytes


def verify_log_extension(old: LogHead, new: LogHead, proof: Sequence[bytes]) -> None:
    """Raise a :class:`~protogalaxy.crypto.errors.ProofError` unless ``new`` extends
    ``old`` (the RFC 9162 consistency check)."""
    verify_consistency(old.size, new.size, old.root, new.root, proof)


def record_round(record: SignedDocument) -> int:
    """The round a round record is for (``ValueError`` when it names none)."""
    rnd = record.body.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ValueError("round record: no round")
    return rnd


class AuditLog:
    """Append-only Merkle log of signed round records.

    Parameters
    ----------
    path
        File to persist to; ``None`` keeps the log in memory only.
    trusted_key
        When given, every record (loaded or appended) must be signed by this key,
        in ``run``.
    run
        The run every record must belong to (required with ``trusted_key``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        trusted_key: VerifyKey | None = None,
        run: str | None = None,
    ) -> None:
        if trusted_key is not None and run is None:
            raise ValueError("a trusted_key needs the run its heads belong to")
        self._path = None if path is None else Path(path)
        self._key = trusted_key
        self._run = run
        self._entries: list[SignedDocument] = []
        self._tree = MerkleTree()
        if self._path is not None:
            self._load()

    # -- persistence -----------------------------------------------------------

    def _load(self) -> None:
        assert self._path is not None
        if not self._path.exists() or self._path.stat().st_size == 0:
            with open(self._path, "wb") as f:
                f.write(_FILE_MAGIC)
                f.flush()
                os.fsync(f.fileno())
            return
        data = self._path.read_bytes()
        good = self._parse(data, str(self._path))
        if good < len(data):
            _log.warning(
                "audit log %s: dropping a torn record of %d bytes at its end",
                self._path,
                len(data) - good,
            )
            with open(self._path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    def _parse(self, data: bytes, where: str) -> int:
        """Add every complete record of ``data``; return where the last one ends."""
        if not data.startswith(_FILE_MAGIC):
            raise ValueError(f"{where}: not a ProtoGalaxy audit log (bad magic)")
        pos = good = len(_FILE_MAGIC)
        while pos + _LEN.size <= len(data):
            (length,) = _LEN.unpack_from(data, pos)
            if length > _MAX_RECORD:
                raise ValueError(f"{where}: record at byte {pos} claims {length} bytes")
            end = pos + _LEN.size + length
            if end > len(data):
                break
            try:
                record = SignedDocument.from_bytes(
                    data[pos + _LEN.size : end], kind=_KIND
                )
                record_round(record)
            except ValueError as exc:
                raise ValueError(
                    f"{where}: corrupt record at byte {pos}: {exc}"
                ) from None
            self._check(record)
            self._add(record)
            pos = good = end
        return good

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        trusted_key: VerifyKey | None = None,
        run: str | None = None,
    ) -> AuditLog:
        """An in-memory log from :meth:`to_bytes` output; it must be complete."""
        log = cls(trusted_key=trusted_key, run=run)
        if log._parse(bytes(data), "audit log bytes") != len(data):
            raise ValueError("audit log bytes: truncated record at the end")
        return log

    def _check(self, record: SignedDocument) -> None:
        if not isinstance(record, SignedDocument) or record.kind != _KIND:
            raise TypeError(f"expected a signed round record, got {record!r:.80}")
        rnd = record_round(record)
        if self._run is not None and record.body.get("run") != self._run:
            raise ValueError(
                f"round {rnd} record is of run {record.body.get('run')!r}, "
                f"this log is of run {self._run!r}"
            )
        if self._key is not None:
            assert self._run is not None
            record.verify(self._key, run=self._run)
        if self._entries and rnd <= record_round(self._entries[-1]):
            raise ValueError(
                f"round {rnd} does not follow the last logged round "
                f"{record_round(self._entries[-1])}"
            )

    def _add(self, record: SignedDocument) -> int:
        self._entries.append(record)
        return self._tree.append(record.to_bytes())

    def append(self, record: SignedDocument) -> int:
        """Append a signed round record (durably, when persistent); return its index.

        The record is on disk before the in-memory log changes, so a failed write
        leaves both as they were.
        """
        self._check(record)
        if self._path is not None:
            data = record.to_bytes()
            with open(self._path, "ab") as f:
                f.write(_LEN.pack(len(data)) + data)
                f.flush()
                os.fsync(f.fileno())
        return self._add(record)

    def to_bytes(self) -> bytes:
        """The log in its file format, for snapshots inside checkpoints."""
        parts = [_FILE_MAGIC]
        for record in self._entries:
            data = record.to_bytes()
            parts += [_LEN.pack(len(data)), data]
        return b"".join(parts)

    # -- queries ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._tree.size

    @property
    def root(self) -> bytes:
        return self._tree.root

    def head(self, size: int | None = None) -> LogHead:
        """The log head now, or at an earlier ``size``."""
        if size is None:
            return LogHead(self.size, self.root)
        return LogHead(size, self._tree.root_at(size))

    def entry(self, index: int) -> SignedDocument:
        return self._entries[index]

    @property
    def entries(self) -> tuple[SignedDocument, ...]:
        return tuple(self._entries)

    def inclusion_proof(
        self, index: int, tree_size: int | None = None
    ) -> InclusionProof:
        return self._tree.inclusion_proof(index, tree_size)

    def consistency_proof(
        self, old_size: int, new_size: int | None = None
    ) -> list[bytes]:
        return self._tree.consistency_proof(old_size, new_size)

"""Atomic, verifiable checkpoints of the global aggregator (the PVC's contents).

A checkpoint file ``ckpt-<round>.pgck`` is::

    b"PGCK\\x01" || u64 meta_len || meta (JSON) || PGT1 tensors || SHA-256(all before)

Saving writes a temporary file in the same directory, fsyncs it, renames it into
place and fsyncs the directory, so a crash leaves either the old set of checkpoints
or the new one, never a half-written file under a checkpoint's name. Loading walks
from the newest checkpoint to the oldest and takes the first whose digest verifies,
so a file damaged on disk costs one checkpoint interval, not the run. The last
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from protogalaxy.codec import decode_update, encode_update

__all__ = ["Checkpoint", "CheckpointDir", "decode_checkpoint", "encode_checkpoint"]

_log = logging.getLogger("protogalaxy.checkpoint")
_MAGIC: Final = b"PGCK\x01"
_NAME: Final = re.compile(r"^ckpt-(\d{8})\.pgck$")


@dataclass
class Checkpoint:
    round: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    meta = json.dumps(
        {"round": checkpoint.round, **checkpoint.meta}, sort_keys=True
    ).encode()
    body = (
        _MAGIC + struct.pack("<Q", len(meta)) + meta + encode_update(checkpoint.tensors)
    )
    return body + hashlib.sha256(body).digest()


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Raise ``ValueError`` unless ``data`` is a complete, untampered checkpoint."""
    if len(data) < len(_MAGIC) + 8 + 32 or not data.startswith(_MAGIC):
        raise ValueError("checkpoint: bad magic or truncated")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checkpoint: digest mismatch (torn or damaged file)")
    (meta_len,) = struct.unpack_from("<Q", body, len(_MAGIC))
    start = len(_MAGIC) + 8
    meta = json.loads(body[start : start + meta_len])
    tensors = decode_update(body[start + meta_len :])
    return Checkpoint(int(meta.pop("round")), meta, tensors)


class CheckpointDir:
    """The checkpoints in one directory."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def _rounds(self) -> list[int]:
        rounds = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                rounds.append(int(m.group(1)))
        return sorted(rounds)

    def path(self, round: int) -> Path:
        return self.directory / f"ckpt-{round:08d}.pgck"

    def rounds(self) -> list[int]:
        """The rounds of the checkpoint files present, verified or not."""
        return self._rounds()

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write atomically (temp file, fsync, rename, fsync dir); prune old ones."""
        final = self.path(checkpoint.round)
        write_atomically(final, encode_checkpoint(checkpoint))
        for old in self._rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None."""
        for rnd in reversed(self._rounds()):
            try:
                return decode_checkpoint(self.path(rnd).read_bytes())
            except (OSError, ValueError) as exc:
                _log.warning(
                    "checkpoint %s is unusable (%s); trying an older one", rnd, exc
                )
        return None


def write_atomically(final: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename into place, fsync the
    directory: a crash leaves the old file or the new one, never a torn one."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_HEAD_NAME = re.compile(r"^head-(\d{8,})\.json$")


class HeadDir:
    """The signed round documents (roots and head) of the global aggregator, one
    file per round, each written before its head is handed out: after a
    restart the same head is served again, and the rounds present beyond the
    restored checkpoint show what a lost checkpoint took away."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, round: int) -> Path:
        return self.directory / f"head-{round:08d}.json"

    def rounds(self) -> list[int]:
        return sorted(
            int(m.group(1))
            for p in self.directory.iterdir()
            if (m := _HEAD_NAME.match(p.name))
        )

    def save(self, doc: dict[str, Any]) -> None:
        write_atomically(
            self.path(int(doc["round"])), json.dumps(doc, sort_keys=True).encode()
        )

    def load(self, round: int) -> dict[str, Any] | None:
        """The document of ``round``; None if there is none; ``ValueError`` if
        the file is not one."""
        try:
            raw = self.path(round).read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{self.path(round)}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("round") != round:
            raise ValueError(f"{self.path(round)} is not the head of round {round}")
        return doc

    def prune(self, below: int) -> None:
        """Forget the documents of rounds before ``below``."""
        for rnd in self.rounds():
            if rnd < below:
                self.path(rnd).unlink(missing_ok=True)

"""What a run publishes for anyone to check (``protogalaxy audit RUN_DIR``).

``simulate`` writes it into its run directory and the global aggregator into its
data directory (``protogalaxy up`` into the run directory), round by round:

::

    run.json                          run id, configuration, the model's tensors
    keys/global.pub                   the global aggregator's public key (hex)
    keys/galaxies.pub, clients.pub    the galaxies' and clients' keyrings
    audit/log.bin                     the audit log: every signed round record
    audit/rounds/<r>/reference.pgt1   the reference direction the galaxies used
    audit/rounds/<r>/server_update.pgt1   FLTrust: the server's root-data update
    audit/rounds/<r>/misbehaviour.jsonl   galaxy_misbehaved records with proofs
    audit/rounds/<r>/galaxy-<g>/leaf.json        signed root
    audit/rounds/<r>/galaxy-<g>/aggregate.json   signed aggregate statement
    audit/rounds/<r>/galaxy-<g>/transcript.json  signed transcript
    audit/rounds/<r>/galaxy-<g>/reputation.json  reputation state before and after
    audit/rounds/<r>/galaxy-<g>/acks.jsonl       acknowledgements clients forwarded
    audit/updates/<r>/galaxy-<g>/<client>.pgt1   revealed updates (the last rounds)
    evidence.jsonl                    quarantine, ban, rejection and withholding
                                      records, each signed by its galaxy
    receipts.jsonl                    clients' receipts (where clients wrote them)

No private key is ever written there.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protogalaxy.codec import encode_update
from protogalaxy.crypto.audit import AuditLog, record_round
from protogalaxy.crypto.statements import SignedDocument
from protogalaxy.spec import UpdateSpec

__all__ = [
    "ArtefactWriter",
    "GalaxyArtefacts",
    "is_published",
    "published",
    "round_dir",
]

#: the only paths a run publishes (anything else in its directory, such as ``up``'s
#: ``secrets/`` and ``logs/``, is never served to auditors)
_PUBLISHED = re.compile(
    r"run\.json|evidence\.jsonl|receipts\.jsonl|keys/[A-Za-z0-9_.-]+\.pub"
    r"|audit/log\.bin"
    r"|audit/rounds/\d{6}/(reference\.pgt1|misbehaviour\.jsonl"
    r"|galaxy-\d+/(leaf|aggregate|transcript|reputation)\.json|galaxy-\d+/acks\.jsonl)"
    r"|audit/updates/\d{6}/galaxy-\d+/\d+\.pgt1"
)


def is_published(rel: str) -> bool:
    """Whether ``rel`` (a POSIX path relative to the run) is a published artefact."""
    return _PUBLISHED.fullmatch(rel) is not None


def published(root: str | Path) -> list[str]:
    """The published artefacts under ``root``, sorted, as relative POSIX paths
    (symbolic links are never followed or listed)."""
    root = Path(root)
    found = []
    for p in root.rglob("*"):
        if p.is_symlink() or not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if is_published(rel):
            found.append(rel)
    return sorted(found)


def round_dir(root: Path, round: int) -> Path:
    return Path(root) / "audit" / "rounds" / f"{round:06d}"


def _compact(obj: Any) -> str:
    """One JSON form with no insignificant byte: a byte changed anywhere changes
    what is read (and so a signature or digest fails), or is unreadable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(_compact(obj) + "\n")
    tmp.replace(path)


def _append_jsonl(path: Path, records: Iterable[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(_compact(r) + "\n")


@dataclass
class GalaxyArtefacts:
    """What one galaxy signed in one round, and the acknowledgements forwarded."""

    leaf: dict[str, Any]
    aggregate: dict[str, Any] | None = None
    transcript: SignedDocument | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    acks: list[dict[str, Any]] = field(default_factory=list)


class ArtefactWriter:
    """Writes a run's artefacts under ``root`` as the run goes."""

    def __init__(self, root: Path, *, keep_updates: int = 3) -> None:
        self.root = Path(root)
        self.keep_updates = keep_updates
        (self.root / "audit").mkdir(parents=True, exist_ok=True)
        self.log = AuditLog(self.root / "audit" / "log.bin")

    def write_identity(
        self,
        run: str,
        config: dict[str, Any],
        public: Mapping[str, bytes],
        spec: UpdateSpec,
    ) -> None:
        """``run.json`` (run id, configuration, the model's tensors) and the public
        keys (only the ``*.pub`` files)."""
        _write_json(
            self.root / "run.json",
            {
                "run": run,
                "config": config,
                "spec": {"names": list(spec.names), "shapes": list(spec.shapes)},
            },
        )
        keys = self.root / "keys"
        keys.mkdir(exist_ok=True)
        for name, data in public.items():
            if name.endswith(".pub"):
                (keys / name).write_bytes(data)

    def write_round(
        self,
        round: int,
        *,
        record: SignedDocument,
        galaxies: Mapping[int, GalaxyArtefacts],
        reference: torch.Tensor | None,
        misbehaviour: Iterable[dict[str, Any]] = (),
        server_update: torch.Tensor | None = None,
    ) -> None:
        if self.log.size and record_round(self.log.entry(-1)) >= round:
            return  # already published (a restarted global aggregator)
        d = round_dir(self.root, round)
        d.mkdir(parents=True, exist_ok=True)
        if reference is not None:
            (d / "reference.pgt1").write_bytes(
                encode_update({"direction": reference.detach().float().cpu()})
            )
        if server_update is not None:
            (d / "server_update.pgt1").write_bytes(
                encode_update({"update": server_update.detach().float().cpu()})
            )
        for g, a in galaxies.items():
            gd = d / f"galaxy-{g}"
            _write_json(gd / "leaf.json", a.leaf)
            if a.aggregate is not None:
                _write_json(gd / "aggregate.json", a.aggregate)
            if a.transcript is not None:
                _write_json(gd / "transcript.json", a.transcript.to_dict())
                _write_json(
                    gd / "reputation.json", {"before": a.before, "after": a.after}
                )
            if a.acks:
                (gd / "acks.jsonl").unlink(missing_ok=True)
                _append_jsonl(gd / "acks.jsonl", a.acks)
        records = list(misbehaviour)
        if records:
            _append_jsonl(d / "misbehaviour.jsonl", records)
        self.log.append(record)

    def write_updates(
        self, round: int, galaxy: int, updates: Mapping[int, bytes]
    ) -> None:
        """Revealed updates of ``round`` for ``galaxy``; only the last
        ``keep_updates`` rounds stay."""
        if self.keep_updates <= 0:
            return
        d = self.root / "audit" / "updates" / f"{round:06d}" / f"galaxy-{galaxy}"
        d.mkdir(parents=True, exist_ok=True)
        for c, body in updates.items():
            (d / f"{c}.pgt1").write_bytes(bytes(body))
        old = round - self.keep_updates
        base = self.root / "audit" / "updates"
        for r in base.iterdir():
            if r.name.isdigit() and int(r.name) <= old:
                shutil.rmtree(r, ignore_errors=True)

    def append_evidence(self, records: Iterable[dict[str, Any]]) -> None:
        _append_jsonl(self.root / "evidence.jsonl", records)

    def append_receipts(self, receipts: Iterable[dict[str, Any]]) -> None:
        _append_jsonl(self.root / "receipts.jsonl", receipts)

"""A galaxy's round transcript: what it did with every leaf, signed.

When a galaxy closes a round it signs (a :class:`~protogalaxy.crypto.statements.
SignedDocument` of kind ``transcript``) a JSON document with, for the run, round,
galaxy, root and tree size of the round:

* for every leaf of its tree, in client order: the client's commitment and its
  signature over it, and the leaf's *fate*: ``aggregated`` (with its integer weight),
  ``excluded`` (revealed and passed layer 1, but flagged by layer 2, inactive in
  layer 4 or not selected by layer 3: the ``flags``, ``active`` and ``selected``
  fields say which), ``rejected`` at layer 1 (the ``reason``), or ``withheld`` (no
  reveal); for every reveal the nonce, the reveal digest and the client's own
  signature over them, so only the client can have sent it;
* the digests of the defense configuration, of the reference direction the
  statistics used, of the galaxy's reputation state before and after the round, and
  of the aggregate; the rule and ``f`` layer 3 used, and the aggregate's weight.

Its digest (SHA-256 of the canonical JSON) is what the galaxy's aggregate statement
binds to. With the transcript, the reputation state before the round and the
revealed updates, anyone can replay the round (:mod:`protogalaxy.protocol.audit`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Final

import torch

from protogalaxy.crypto.statements import canonical_json
from protogalaxy.defense.pipeline import DefenseConfig
from protogalaxy.defense.reputation import ClientRecord, ReputationTracker

__all__ = [
    "FATES",
    "VERSION",
    "defense_digest",
    "digest_hex",
    "finite_metrics",
    "load_reputation_state",
    "reputation_state",
    "tensor_digest",
]

VERSION: Final = 1
FATES: Final = ("aggregated", "excluded", "rejected", "withheld")


def digest_hex(obj: Any) -> str:
    """SHA-256 (hex) of ``obj``'s canonical JSON."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def tensor_digest(t: torch.Tensor | None) -> str | None:
    """SHA-256 (hex) of a tensor's float32 little-endian values (None for None)."""
    if t is None:
        return None
    values = t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(values).hexdigest()


def reputation_state(tracker: ReputationTracker) -> dict[str, Any]:
    """The part of a galaxy's reputation state the rounds depend on, as JSON: the
    reputation, status and history counts of every client scored at least once (a
    record nobody scored yet is the initial one, whether it exists or not; the event
    log is not state)."""
    return {
        "galaxy": tracker.galaxy,
        "clients": {
            str(c): dataclasses.asdict(r)
            for c, r in sorted(tracker.clients.items())
            if r.rounds > 0
        },
    }


def load_reputation_state(tracker: ReputationTracker, state: dict[str, Any]) -> None:
    """Set ``tracker``'s clients from :func:`reputation_state` output."""
    if state.get("galaxy") != tracker.galaxy:
        raise ValueError(
            f"reputation state is for galaxy {state.get('galaxy')}, "
            f"not {tracker.galaxy}"
        )
    tracker.clients = {int(c): ClientRecord(**r) for c, r in state["clients"].items()}


def defense_digest(config: DefenseConfig) -> str:
    """Digest of a defense configuration: the rules a replay must use."""
    d = dataclasses.asdict(config)
    d["layers"] = sorted(config.layers)
    # Settings added later are left out at the value that reproduces the
    # defense as it was before them, so runs made before them still audit.
    if d["statistics"]["norm_floor"] == 0.0:
        del d["statistics"]["norm_floor"]
    return digest_hex(d)


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON can hold them: non-finite floats become None."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            out[k] = None
        else:
            out[k] = v
    return out

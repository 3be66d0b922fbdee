"""Replay audits: checking what a galaxy did in a round from what it signed.

Two levels, both failing closed with a :class:`Misbehaviour` that carries its proof
(the galaxy's own signed statements, and what contradicts them):

:func:`check_transcript` needs no update. It checks the transcript's signature and
its binding to the galaxy's signed root and aggregate statement; that it has one
entry per leaf, each a commitment its client signed, so the tree is the one the
galaxy committed to; that every reveal in it carries the client's own signature;
that the weights add up; that the reputation state it starts from is the one the
previous round ended with; and that every reveal the galaxy acknowledged (clients
forward their acknowledgements) is in it as taken, not dropped.

:func:`replay` takes the revealed updates as well. Each must match its leaf and the
client's signed reveal; layer 1 is run again (a rejection must hold, an acceptance
too); layers 2-4 are run again from the published reputation state, with the
published decisions as hints that must be consistent within
:data:`~protogalaxy.defense.pipeline.TOLERANCE`; and the aggregate is recomputed
exactly (:mod:`protogalaxy.defense.exact`) and must match bit for bit, as must the
reputation state the round ends with.

A galaxy caught by either has its contribution excluded and is isolated; the
global aggregator, ``protogalaxy audit`` and anyone else run the same code.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.errors import VerificationError
from protogalaxy.crypto.identity import (
    VerifyKey,
    reveal_digest,
    verify_commitment_signature,
    verify_reveal_signature,
)
from protogalaxy.crypto.statements import (
    Acknowledgement,
    AggregateStatement,
    Signed,
    SignedDocument,
)
from protogalaxy.crypto.trees import GalaxyLeaf, GalaxyTree
from protogalaxy.defense.integrity import IntegrityError, check_reveal
from protogalaxy.defense.pipeline import (
    DefenseConfig,
    GalaxyDefense,
    ReplayHints,
    ReplayMismatch,
)
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.transcript import (
    FATES,
    VERSION,
    defense_digest,
    digest_hex,
    load_reputation_state,
    reputation_state,
    tensor_digest,
)
from protogalaxy.spec import UpdateSpec

__all__ = [
    "REJECTABLE",
    "AuditContext",
    "GalaxyRound",
    "Misbehaviour",
    "audit_galaxy",
    "carry_over",
    "check_transcript",
    "replay",
    "updates_needed",
]

_REVEALED = ("aggregated", "excluded")
#: the layer-1 reasons a rejection in a transcript may give: those a recomputation
#: of layer 1 (check_reveal) can reach; anything else cannot be checked
REJECTABLE: frozenset[str] = frozenset(
    ("too_large", "commitment_mismatch", "malformed", "shape", "dtype", "non_finite")
)


class Misbehaviour(Exception):
    """A galaxy's signed statements contradict each other or the recomputation.

    ``kind`` names what (``missing_transcript``, ``bad_signature``,
    ``transcript_mismatch``, ``forged_leaf``, ``not_member``, ``not_sampled``,
    ``forged_reveal``,
    ``dropped_after_ack``, ``weight_mismatch``, ``aggregate_mismatch``,
    ``reputation_mismatch``, ``missing_update``, ``tampered_update``,
    ``false_rejection``, ``false_acceptance``, ``false_decision``,
    ``malformed_transcript``: a signed transcript the audit cannot even read);
    ``proof`` holds the signed statements and the recomputed values that show it.
    """

    def __init__(
        self, galaxy: int, round: int, kind: str, detail: str, proof: dict[str, Any]
    ) -> None:
        super().__init__(f"galaxy {galaxy} round {round}: {kind}: {detail}")
        self.galaxy, self.round = galaxy, round
        self.kind, self.detail, self.proof = kind, detail, proof

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "galaxy_misbehaved",
            "galaxy": self.galaxy,
            "round": self.round,
            "kind": self.kind,
            "detail": self.detail,
            "proof": self.proof,
        }


@dataclass
class GalaxyRound:
    """What a galaxy signed for one round, and the acknowledgements its clients
    forwarded."""

    galaxy: int
    round: int
    leaf: Signed[GalaxyLeaf]
    transcript: SignedDocument | None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    aggregate: Signed[AggregateStatement] | None = None
    acks: list[Signed[Acknowledgement]] = field(default_factory=list)

    def proof(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"leaf": self.leaf.to_dict()}
        if self.transcript is not None:
            out["transcript"] = self.transcript.to_dict()
        if self.aggregate is not None:
            out["aggregate"] = self.aggregate.to_dict()
        out.update(extra)
        return out


@dataclass
class AuditContext:
    """What the auditor knows independently of the galaxy."""

    run: str
    galaxy_key: VerifyKey
    client_keys: Mapping[int, VerifyKey]
    spec: UpdateSpec
    defense: DefenseConfig
    #: the reference direction the galaxy had to use (the global aggregator's)
    reference: torch.Tensor | None
    max_update_bytes: int = 64 << 20
    #: digest of the reputation state the round must start from, when known
    expected_before: str | None = None
    #: the clients placed in this galaxy for the round (None: not checked)
    members: frozenset[int] | None = None
    #: the clients the round's sample admits to this galaxy (None: every one)
    sampled: frozenset[int] | None = None
    #: the global aggregator's update on its root dataset, for FLTrust (None:
    #: the round had none, and the transcript must name none)
    server_update: torch.Tensor | None = None


def _fail(gr: GalaxyRound, kind: str, detail: str, **extra: Any) -> Misbehaviour:
    return Misbehaviour(gr.galaxy, gr.round, kind, detail, gr.proof(**extra))


def check_transcript(gr: GalaxyRound, ctx: AuditContext) -> dict[str, Any]:
    """Everything about a galaxy's round that needs no update (module docstring);
    the transcript's body when it holds."""
    if gr.transcript is None:
        raise _fail(gr, "missing_transcript", "the galaxy gave no transcript")
    try:
        gr.transcript.verify(ctx.galaxy_key, run=ctx.run)
    except VerificationError as exc:
        raise _fail(gr, "bad_signature", f"transcript: {exc}") from None
    body = gr.transcript.body
    leaf = gr.leaf.statement
    expected = {
        "version": VERSION,
        "run": ctx.run,
        "round": gr.round,
        "galaxy": gr.galaxy,
        "root": leaf.root.hex(),
        "tree_size": leaf.tree_size,
        "defense": defense_digest(ctx.defense),
        "reference": tensor_digest(ctx.reference),
        "server_update": tensor_digest(ctx.server_update),
    }
    for key, want in expected.items():
        if body.get(key) != want:
            raise _fail(
                gr,
                "transcript_mismatch",
                f"transcript {key} is {body.get(key)!r}, it must be {want!r}",
            )
    _check_reputation(gr, body, ctx)
    _check_aggregate_binding(gr, body)
    entries = _check_entries(gr, body, ctx)
    _check_acks(gr, entries)
    return body


_RECORD_FIELDS = frozenset(
    ("reputation", "status", "rounds", "clean_rounds", "last_round")
)


def _state_problem(state: Any, galaxy: int) -> str | None:
    """Why ``state`` is not a reputation state of ``galaxy`` (None: it is one)."""
    if not isinstance(state, dict) or state.get("galaxy") != galaxy:
        return "not a reputation state of this galaxy"
    clients = state.get("clients")
    if not isinstance(clients, dict):
        return "its clients are not an object"
    for c, r in clients.items():
        if not (isinstance(c, str) and c.isdigit() and isinstance(r, dict)):
            return f"client record {c!r} is malformed"
        if set(r) != _RECORD_FIELDS:
            return f"client {c}'s record has fields {sorted(r)}"
        if not isinstance(r.get("reputation"), (int, float)) or isinstance(
            r.get("reputation"), bool
        ):
            return f"client {c}'s reputation is not a number"
        if r.get("status") not in ("active", "quarantined", "banned"):
            return f"client {c}'s status is {r.get('status')!r}"
        for k in ("rounds", "clean_rounds", "last_round"):
            if not _is_int(r.get(k)):
                return f"client {c}'s {k} is not an integer"
    return None


def _check_reputation(gr: GalaxyRound, body: dict[str, Any], ctx: AuditContext) -> None:
    for name, state in (("before", gr.before), ("after", gr.after)):
        problem = _state_problem(state, gr.galaxy)
        if problem is not None:
            raise _fail(
                gr, "malformed_transcript", f"the reputation state {name}: {problem}"
            )
    for name, state in (("before", gr.before), ("after", gr.after)):
        if state is None or digest_hex(state) != body.get(f"reputation_{name}"):
            raise _fail(
                gr,
                "reputation_mismatch",
                f"the reputation state {name} the round is not the one the "
                "transcript names",
                **{f"reputation_{name}": state},
            )
    if ctx.expected_before is not None and body["reputation_before"] != (
        ctx.expected_before
    ):
        raise _fail(
            gr,
            "reputation_mismatch",
            "the round starts from another reputation state than the last one "
            f"ended with ({ctx.expected_before})",
            reputation_before=gr.before,
        )
    assert gr.before is not None
    if gr.before.get("galaxy") != gr.galaxy:
        raise _fail(gr, "reputation_mismatch", "another galaxy's reputation state")


def _check_aggregate_binding(gr: GalaxyRound, body: dict[str, Any]) -> None:
    agg = gr.aggregate
    if agg is None:
        return
    st = agg.statement
    assert gr.transcript is not None
    if st.transcript != gr.transcript.digest():
        raise _fail(
            gr, "aggregate_mismatch", "the aggregate is bound to another transcript"
        )
    if body.get("aggregate") != st.digest.hex():
        raise _fail(
            gr,
            "aggregate_mismatch",
            "the aggregate sent is not the aggregate the transcript names",
        )
    if body.get("weight") != st.weight:
        raise _fail(
            gr,
            "weight_mismatch",
            f"the aggregate claims weight {st.weight}, the transcript "
            f"{body.get('weight')}",
        )


def _check_entries(
    gr: GalaxyRound, body: dict[str, Any], ctx: AuditContext
) -> dict[int, dict[str, Any]]:
    entries = body.get("clients")
    leaf = gr.leaf.statement
    if not isinstance(entries, list) or len(entries) != leaf.tree_size:
        raise _fail(gr, "transcript_mismatch", "not one entry per leaf of the tree")
    out: dict[int, dict[str, Any]] = {}
    commitments = []
    for e in entries:
        try:
            c = e["client"]
            if not _is_int(c):
                raise TypeError(f"client {c!r} is not an integer")
            com = Commitment.from_bytes(bytes.fromhex(e["commitment"]))
            sig = bytes.fromhex(e["commitment_signature"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(gr, "transcript_mismatch", f"malformed entry: {exc}") from None
        key = ctx.client_keys.get(c)
        if com.client_id != c or key is None or c in out:
            raise _fail(gr, "forged_leaf", f"entry {c} is not a client's leaf")
        if ctx.members is not None and c not in ctx.members:
            raise _fail(
                gr,
                "not_member",
                f"client {c} is not placed in this galaxy in this round",
                client=c,
            )
        if ctx.sampled is not None and c not in ctx.sampled:
            raise _fail(
                gr,
                "not_sampled",
                f"client {c} is not in the round's sample of this galaxy",
                client=c,
            )
        try:
            verify_commitment_signature(key, com, sig, run=ctx.run)
        except VerificationError:
            raise _fail(
                gr,
                "forged_leaf",
                f"client {c}'s commitment is not signed by client {c}",
                client=c,
            ) from None
        _check_entry(gr, e, com, key, ctx)
        out[c] = e
        commitments.append(com)
    try:
        tree = GalaxyTree(commitments, galaxy_id=gr.galaxy, round=gr.round)
    except ValueError as exc:
        raise _fail(gr, "forged_leaf", str(exc)) from None
    if tree.root != leaf.root:
        raise _fail(gr, "forged_leaf", "the entries' tree is not the signed root")
    taken = [e for e in entries if e["fate"] == "aggregated"]
    if body.get("aggregate") is not None and body.get("weight") != len(taken):
        raise _fail(
            gr,
            "weight_mismatch",
            f"weight {body.get('weight')} for {len(taken)} aggregated updates",
        )
    return out


def _check_entry(
    gr: GalaxyRound,
    e: dict[str, Any],
    com: Commitment,
    key: VerifyKey,
    ctx: AuditContext,
) -> None:
    c, fate = com.client_id, e.get("fate")
    if fate not in FATES:
        raise _fail(gr, "transcript_mismatch", f"client {c}: fate {fate!r}")
    _check_entry_fields(gr, c, fate, e)
    if fate == "withheld":
        if "nonce" in e:
            raise _fail(gr, "transcript_mismatch", f"client {c}: a withheld reveal")
        return
    try:
        nonce = bytes.fromhex(e["nonce"])
        digest = bytes.fromhex(e["reveal_digest"])
        signature = bytes.fromhex(e["reveal_signature"])
        verify_reveal_signature(key, com, nonce, signature, digest=digest, run=ctx.run)
    except (KeyError, TypeError, ValueError, VerificationError) as exc:
        raise _fail(
            gr,
            "forged_reveal",
            f"client {c}'s reveal is not signed by client {c} ({exc})",
            client=c,
        ) from None
    if fate in _REVEALED and digest != com.digest:
        raise _fail(
            gr,
            "transcript_mismatch",
            f"client {c}: an update taken whose digest is not the committed one",
            client=c,
        )
    mismatch = digest != com.digest
    if fate == "rejected" and mismatch and e.get("reason") != "commitment_mismatch":
        raise _fail(
            gr,
            "false_rejection",
            f"client {c} revealed another update than it committed to, and was "
            f"rejected for {e.get('reason')!r}",
            client=c,
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry_fields(gr: GalaxyRound, c: int, fate: str, e: dict[str, Any]) -> None:
    """The fields a replay reads, of the types it reads them as: a transcript the
    audit cannot read is the galaxy's fault, never a reason to stop the round."""
    problem = None
    if fate == "rejected":
        if e.get("reason") not in REJECTABLE:
            problem = (
                f"rejected for {e.get('reason')!r}, not a layer-1 reason a "
                "recomputation can check"
            )
    elif fate in _REVEALED:
        flags, metrics, weight = (
            e.get("flags", []),
            e.get("metrics", {}),
            e.get("weight"),
        )
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            problem = "flags must be a list of strings"
        elif not isinstance(metrics, dict):
            problem = "metrics must be an object"
        elif weight is not None and not (_is_int(weight) and weight >= 0):
            problem = f"weight {weight!r} is not a non-negative integer"
        elif not isinstance(e.get("active", False), bool) or not isinstance(
            e.get("selected", False), bool
        ):
            problem = "active and selected must be booleans"
    if problem is not None:
        raise _fail(gr, "transcript_mismatch", f"client {c}: {problem}", client=c)


def _check_acks(gr: GalaxyRound, entries: dict[int, dict[str, Any]]) -> None:
    for ack in gr.acks:
        st = ack.statement
        e = entries.get(st.client_id)
        taken = (
            e is not None
            and e.get("fate") in _REVEALED
            and e.get("commitment") == st.commitment.hex()
            and e.get("reveal_digest") == st.digest.hex()
        )
        if st.round != gr.round or st.galaxy_id != gr.galaxy or not taken:
            raise _fail(
                gr,
                "dropped_after_ack",
                f"the galaxy acknowledged client {st.client_id}'s reveal and its "
                "transcript does not take it",
                acknowledgement=ack.to_dict(),
                client=st.client_id,
            )


def updates_needed(body: dict[str, Any]) -> list[int]:
    """The clients whose revealed updates a replay of ``body`` needs: every taken
    reveal, and every rejected one that matched its commitment."""
    out = []
    for e in body["clients"]:
        committed = Commitment.from_bytes(bytes.fromhex(e["commitment"])).digest
        if e["fate"] in _REVEALED or (
            e["fate"] == "rejected" and e["reveal_digest"] == committed.hex()
        ):
            out.append(e["client"])
    return out


def replay(
    gr: GalaxyRound,
    ctx: AuditContext,
    updates: Mapping[int, bytes],
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Replay the round from its transcript, the reputation state before it and
    the revealed updates (``{client: body}``); the reputation state after it,
    verified. ``body``: the transcript's body, when :func:`check_transcript` ran."""
    if body is None:
        body = check_transcript(gr, ctx)
    entries = {e["client"]: e for e in body["clients"]}
    accepted: dict[int, torch.Tensor] = {}
    for c in updates_needed(body):
        e = entries[c]
        com = Commitment.from_bytes(bytes.fromhex(e["commitment"]))
        data = updates.get(c)
        if data is None:
            raise _fail(gr, "missing_update", f"client {c}'s update was not served")
        nonce = bytes.fromhex(e["nonce"])
        if reveal_digest(com, data, nonce) != bytes.fromhex(e["reveal_digest"]):
            raise _fail(
                gr,
                "tampered_update",
                f"the update served for client {c} is not the one it revealed",
                client=c,
            )
        tensors = None
        try:
            tensors = check_reveal(
                com,
                data,
                digest=bytes.fromhex(e["reveal_digest"]),
                spec=ctx.spec,
                max_bytes=ctx.max_update_bytes,
            )
            reason = None
        except IntegrityError as exc:
            reason = exc.reason
        if e["fate"] == "rejected" and reason != e.get("reason"):
            raise _fail(
                gr,
                "false_rejection",
                f"client {c} was rejected for {e.get('reason')!r}; its update "
                f"{'passes layer 1' if reason is None else 'fails for ' + reason}",
                client=c,
            )
        if e["fate"] in _REVEALED:
            if reason is not None:
                raise _fail(
                    gr,
                    "false_acceptance",
                    f"client {c}'s update was taken although it fails {reason}",
                    client=c,
                )
            assert tensors is not None  # it passed layer 1
            accepted[c] = ctx.spec.flatten(tensors)  # a copy of the checked views
    clients = sorted(accepted)
    defense = GalaxyDefense(gr.galaxy, ctx.defense)
    assert gr.before is not None
    load_reputation_state(defense.tracker, gr.before)
    hints = ReplayHints(
        flags={c: frozenset(entries[c].get("flags", ())) for c in clients},
        selected=frozenset(c for c in clients if entries[c]["fate"] == "aggregated"),
        weights={
            c: int(entries[c]["weight"])
            for c in clients
            if entries[c].get("weight") is not None
        },
        null_weight=body.get("null_weight"),
    )
    updates_t = (
        torch.stack([accepted[c] for c in clients])
        if clients
        else torch.zeros(0, ctx.spec.numel)
    )
    try:
        report = defense.run(
            round=gr.round,
            clients=clients,
            updates=updates_t,
            rejected={
                c: e["reason"] for c, e in entries.items() if e["fate"] == "rejected"
            },
            withheld=[c for c, e in entries.items() if e["fate"] == "withheld"],
            reference_direction=ctx.reference,
            hints=hints,
            server_update=ctx.server_update,
        )
    except ReplayMismatch as exc:
        raise _fail(gr, "false_decision", str(exc)) from None
    for c in clients:
        o, e = report.outcomes[c], entries[c]
        mine = {
            "fate": "aggregated" if o.selected else "excluded",
            "flags": list(o.flags),
            "active": o.active,
            "selected": o.selected,
            "weight": o.weight,
        }
        theirs = {k: e.get(k) for k in mine}
        if mine != theirs:
            raise _fail(
                gr,
                "false_decision",
                f"client {c}: published {theirs}, the replay gives {mine}",
                client=c,
                recomputed=mine,
            )
    for key, mine_v in (("rule", report.rule), ("f", report.f)):
        if body.get(key) != mine_v:
            raise _fail(
                gr,
                "false_decision",
                f"{key} published {body.get(key)!r}, the replay gives {mine_v!r}",
            )
    recomputed = tensor_digest(report.aggregate)
    if recomputed != body.get("aggregate"):
        raise _fail(
            gr,
            "aggregate_mismatch",
            "the aggregate recomputed from the revealed updates differs from the "
            "published one",
            recomputed_aggregate=recomputed,
        )
    after = reputation_state(defense.tracker)
    if digest_hex(after) != body.get("reputation_after"):
        raise _fail(
            gr,
            "reputation_mismatch",
            "the reputation state the replay ends with differs from the published",
            recomputed_reputation_after=after,
        )
    return after


def audit_galaxy(
    gr: GalaxyRound,
    ctx: AuditContext,
    updates: Mapping[int, bytes] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """:func:`check_transcript`, then :func:`replay` when ``updates`` are given:
    the transcript's body and the verified reputation state after the round.

    Whatever the galaxy signed, this ends in a result or a :class:`Misbehaviour`:
    a transcript that makes the checks fail in any other way (a field of the wrong
    type, a reputation record that does not load) is ``malformed_transcript``, so
    no galaxy can stop a round, or ``protogalaxy audit``, with what it signs."""
    try:
        body = check_transcript(gr, ctx)
        after = None if updates is None else replay(gr, ctx, updates, body)
    except Misbehaviour:
        raise
    except Exception as exc:  # the galaxy's input, whatever it holds
        raise _fail(
            gr, "malformed_transcript", f"{type(exc).__name__}: {exc}"
        ) from None
    return body, after


def carry_over(
    assignment: Assignment,
    galaxy: int,
    expected: dict[int, dict[str, Any]],
    verified: Mapping[int, dict[str, Any]],
) -> Assignment:
    """Isolate ``galaxy``: the placement without it, and each adopting galaxy's
    expected reputation state (``expected``, updated in place) gains its new
    clients' records from ``galaxy``'s last verified state (``verified``), not from
    the round it lied in. The global aggregator and any auditor both use it."""
    new = assignment.isolate([galaxy])
    trusted = verified.get(galaxy, {"clients": {}})["clients"]
    for c in new.moved():
        if assignment.home(c) != galaxy:
            continue
        target = expected[new.galaxy_of(c)]["clients"]
        record = trusted.get(str(c))
        if record is not None and str(c) not in target:
            target[str(c)] = copy.deepcopy(record)
    return new

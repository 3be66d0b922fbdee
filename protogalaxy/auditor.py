"""``protogalaxy audit``: verify a run from what it published.

Given a run directory (:mod:`protogalaxy.artefacts`) and nothing else, it checks:

* the audit log: every round record signed by the global key in the run, rounds
  increasing, and every earlier size consistent with the last (RFC 9162
  consistency proofs);
* every round's signed head, and that the global tree of the galaxies' signed roots
  is the one it signs;
* for every galaxy of every round: its signed root, aggregate statement and
  transcript, the acknowledgements its clients forwarded, and that they are the ones
  the round record names; the transcript checked as the global aggregator checks it,
  and the round replayed from the kept updates (:mod:`protogalaxy.protocol.audit`);
  where the record says a galaxy misbehaved, the audit must find it too;
* every evidence record: the galaxy's signature, the client's signed commitment and
  reveal in it, and that it matches the transcript of its round (and that every
  rejection, withholding and status change in a transcript has its record);
* every client receipt, against the global key and the run.

It prints one line per round and returns the number of failures: each names the
round and the party (``global``, ``galaxy g``, ``client c``) or the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from protogalaxy.artefacts import round_dir
from protogalaxy.codec import decode_update
from protogalaxy.config import recorded_config
from protogalaxy.crypto.audit import AuditLog, record_round
from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.errors import VerificationError
from protogalaxy.crypto.heads import SignedRoundHead
from protogalaxy.crypto.identity import (
    VerifyKey,
    verify_commitment_signature,
    verify_reveal_signature,
)
from protogalaxy.crypto.keyring import parse_keyring
from protogalaxy.crypto.merkle import verify_consistency
from protogalaxy.crypto.receipts import Receipt, verify_receipt
from protogalaxy.crypto.statements import (
    Acknowledgement,
    AggregateStatement,
    Signed,
    SignedDocument,
    canonical_json,
    verify_inline,
)
from protogalaxy.crypto.trees import GalaxyLeaf, GlobalTree
from protogalaxy.defense.robust import available_aggregators, resolve_aggregator
from protogalaxy.plugins import untrusted
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.audit import (
    AuditContext,
    GalaxyRound,
    Misbehaviour,
    audit_galaxy,
    carry_over,
    updates_needed,
)
from protogalaxy.protocol.global_aggregator import keyring_digest
from protogalaxy.protocol.transcript import digest_hex, tensor_digest
from protogalaxy.spec import UpdateSpec

__all__ = ["audit_run"]


class _Failures:
    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        line = f"FAIL {where}: {what}"
        self.items.append(line)
        self.out(line)


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


#: (round, galaxy) -> (signed transcript, reputation state before, after)
_Transcripts = dict[tuple[int, int], tuple[SignedDocument, Any, Any]]


class _Run:
    """A run directory, loaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        meta = _json(root / "run.json")
        self.run: str = meta["run"]
        self.config_dict = meta["config"]
        self.config = recorded_config(meta["config"])
        spec = meta["spec"]
        self.spec = UpdateSpec(
            tuple(spec["names"]), tuple(tuple(s) for s in spec["shapes"])
        )
        keys = root / "keys"
        self.global_key = VerifyKey.from_bytes(
            bytes.fromhex((keys / "global.pub").read_text().strip())
        )
        self.galaxy_keys = parse_keyring((keys / "galaxies.pub").read_text())
        self.client_keys = parse_keyring((keys / "clients.pub").read_text())
        #: the last round in the audit log
        self.last_round = -1
        #: what every round record must bind: run.json's config and the keyrings
        self.binding = {
            "config": digest_hex(self.config_dict),
            "galaxy_keys": keyring_digest(self.galaxy_keys),
            "client_keys": keyring_digest(self.client_keys),
        }


def audit_run(
    root: str | Path,
    *,
    global_key: str | None = None,
    in_progress: bool = False,
    allow_imports: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    """Verify the run in ``root``; print one line per round; the failure count.

    ``global_key`` (hex) pins the global aggregator's key; without it the run's
    ``keys/global.pub`` is the trust anchor, and is printed to compare.
    ``in_progress``: the run may not have finished, so an audit log that ends
    before the configured last round is not a failure (it is otherwise: a log
    with its last records cut off is still a consistent log).
    ``allow_imports``: the run's config may name code by ``package.module:attr``
    (a user's aggregation rule, which the replay needs); it is imported only
    then, since importing runs it."""
    fails = _Failures(out)
    try:
        if allow_imports:
            _audit_run(Path(root), global_key, in_progress, fails, out)
        else:  # run.json is the audited party's word: it names no code we run
            with untrusted():
                _audit_run(Path(root), global_key, in_progress, fails, out)
    except Exception as exc:  # whatever the directory holds: a failure, named
        fails.add(str(root), f"cannot be audited: {type(exc).__name__}: {exc}")
        out(f"audit: {len(fails.items)} failure(s)")
    return len(fails.items)


def _audit_run(
    root: Path,
    global_key: str | None,
    in_progress: bool,
    fails: _Failures,
    out: Callable[[str], None],
) -> None:
    try:
        run = _Run(root)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        fails.add(str(root), f"run.json or keys/ cannot be read ({exc})")
        return
    served = run.global_key.to_bytes().hex()
    if global_key is not None and global_key.lower() != served:
        fails.add("keys/global.pub", f"is {served}, not the pinned {global_key}")
        return
    out(
        f"run {run.run}, global key {served}"
        + (" (pinned)" if global_key else " (from the run; compare it)")
    )
    try:
        log = AuditLog.from_bytes(
            (root / "audit" / "log.bin").read_bytes(),
            trusted_key=run.global_key,
            run=run.run,
        )
    except (OSError, ValueError, VerificationError) as exc:
        fails.add("global: audit/log.bin", str(exc))
        return
    _check_log(log, fails)
    run.last_round = max((record_round(r) for r in log.entries), default=-1)
    transcripts: _Transcripts = {}
    expected = {g: {"galaxy": g, "clients": {}} for g in run.galaxy_keys}
    verified: dict[int, dict[str, Any]] = {}
    assignment = Assignment(run.config.clients.count, run.config.galaxies.count)
    logged = set()
    for record in log.entries:
        rnd = record_round(record)
        logged.add(rnd)
        before = len(fails.items)
        line = _audit_round(
            run, record, transcripts, expected, verified, fails, assignment
        )
        for g in sorted(set(record.body["isolated"]) - assignment.isolated):
            assignment = carry_over(assignment, g, expected, verified)
        status = "ok" if len(fails.items) == before else "FAILED"
        out(f"round {rnd}: {status}; {line}")
    rounds = root / "audit" / "rounds"
    for d in sorted(rounds.iterdir()) if rounds.exists() else ():
        if d.name.isdigit() and int(d.name) not in logged:
            fails.add(f"round {int(d.name)}", "published, but not in the audit log")
    last = run.config.training.rounds - 1
    if not in_progress and max(logged, default=-1) != last:
        fails.add(
            "global: audit/log.bin",
            f"the log ends at round {max(logged, default=-1)}, the run's last round "
            f"is {last}: records are missing at its end (pass --in-progress for a "
            "run that has not finished)",
        )
    _check_evidence(run, transcripts, fails)
    _check_receipts(run, transcripts, fails)
    out(
        "audit: OK, every signature, proof, transcript and replay verifies"
        if not fails.items
        else f"audit: {len(fails.items)} failure(s)"
    )


def _check_log(log: AuditLog, fails: _Failures) -> None:
    for size in range(1, log.size):
        try:
            verify_consistency(
                size, log.size, log.head(size).root, log.root,
                log.consistency_proof(size),
            )  # fmt: skip
        except VerificationError as exc:
            fails.add("global: audit log", f"size {size} is not extended: {exc}")


def _audit_round(
    run: _Run,
    record: SignedDocument,
    transcripts: _Transcripts,
    expected: dict[int, dict[str, Any]],
    verified: dict[int, dict[str, Any]],
    fails: _Failures,
    assignment: Assignment,
) -> str:
    body = record.body
    rnd = record_round(record)
    sampling = run.config.sampling()
    placed = assignment.members()
    where = f"round {rnd}"
    if body.get("binding") != run.binding:
        fails.add(
            f"{where} global",
            "the record binds another configuration or keyring than run.json and "
            "keys/ hold",
        )
    try:
        head = SignedRoundHead.from_dict(body["head"])
        head.verify(run.global_key, run=run.run)
        leaves = [
            GalaxyLeaf.from_dict(g["leaf"])
            for g in body["galaxies"].values()
            if g.get("leaf") is not None
        ]
        tree = GlobalTree(leaves, round=rnd)
        if head.head.round != rnd or head.head.root != tree.root:
            raise ValueError("the signed head is not over the galaxies' roots")
    except (KeyError, TypeError, ValueError, VerificationError) as exc:
        fails.add(f"{where} global", f"round head: {exc}")
    d = round_dir(run.root, rnd)
    reference = None
    # Without the reference direction, or the server update a rule needs, the
    # galaxies' rounds cannot be replayed; the global aggregator (which
    # publishes both) is named, and each galaxy is held to its own signed
    # transcript only, so the next round does not blame it.
    unreplayable = False
    try:
        if (d / "reference.pgt1").exists():
            reference = decode_update(
                (d / "reference.pgt1").read_bytes(),
                max_bytes=run.config.max_update_bytes,
            )["direction"]
    except (OSError, KeyError, ValueError) as exc:
        fails.add(f"{where} global", f"reference.pgt1: {exc}")
        unreplayable = True
    server_update = None
    rule = run.config.defense.aggregator
    if (
        body.get("server_update") is None
        and rule in available_aggregators()  # a built-in: nothing is imported
        and resolve_aggregator(rule).needs_server_update
    ):
        fails.add(
            f"{where} global",
            f"the round record names no server update, which {rule} needs",
        )
        unreplayable = True
    if body.get("server_update") is not None:  # FLTrust's, named by the record
        try:
            server_update = decode_update(
                (d / "server_update.pgt1").read_bytes(),
                max_bytes=run.config.max_update_bytes,
            )["update"]
            if server_update.dtype != torch.float32 or tuple(server_update.shape) != (
                run.spec.numel,
            ):
                # the digest is over float32 values: any other dtype could carry
                # values the signature does not cover
                raise ValueError(
                    f"not {run.spec.numel} float32 values "
                    f"({server_update.dtype}, {tuple(server_update.shape)})"
                )
            if tensor_digest(server_update) != body["server_update"]:
                raise ValueError("not the update the signed round record names")
        except (OSError, KeyError, ValueError) as exc:
            fails.add(f"{where} global", f"server_update.pgt1: {exc}")
            server_update, unreplayable = None, True
    try:
        misbehaviour = {m["galaxy"]: m for m in _jsonl(d / "misbehaviour.jsonl")}
    except (KeyError, TypeError, ValueError) as exc:
        fails.add(f"{where} global", f"misbehaviour.jsonl: {exc}")
        misbehaviour = {}
    counts = {"checked": 0, "replayed": 0}
    notes = []
    for g_str, g in sorted(body["galaxies"].items(), key=lambda kv: int(kv[0])):
        gid = int(g_str)
        if g.get("leaf") is None or g["status"] == "abstained":
            continue
        members = placed.get(gid, [])
        sampled = None if sampling.everyone else sampling.clients(members, rnd, gid)
        note = _audit_galaxy(
            run, rnd, gid, g, d, reference, misbehaviour, transcripts, expected,
            verified, fails, counts, frozenset(members), sampled, server_update,
            unreplayable,
        )  # fmt: skip
        if note:
            notes.append(note)
    return (
        f"{len(body['galaxies'])} galaxies, {counts['checked']} transcripts checked, "
        f"{counts['replayed']} replayed" + "".join(f"; {n}" for n in notes)
    )


def _handed_server_update(run: _Run, rnd: int, body: dict[str, Any]) -> str | None:
    """The digest of the server update the global aggregator signed for this
    round in the statement a transcript carries, or None when it carries no
    valid one."""
    try:
        statement = SignedDocument.from_dict(
            body["server_update_statement"], kind="server-update"
        )
        statement.verify(run.global_key, run=run.run)
        if statement.body.get("run") != run.run or statement.body.get("round") != rnd:
            return None
        digest = statement.body["server_update"]
        return digest if isinstance(digest, str) else None
    except (KeyError, TypeError, ValueError, VerificationError):
        return None


def _hold_to_transcript(
    run: _Run,
    rnd: int,
    gid: int,
    key: Any,
    transcript: SignedDocument | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    expected: dict[int, dict[str, Any]],
    transcripts: _Transcripts,
    fails: _Failures,
) -> str:
    """A galaxy's round the global aggregator's fault makes impossible to replay
    (its reference direction is unreadable, its server update is missing, or it
    signed two): the galaxy is held to its
    own signed transcript and reputation states, which then carry on, so the
    next round does not blame it for the global aggregator's fault."""
    where = f"round {rnd} galaxy {gid}"
    try:
        if transcript is None or before is None or after is None:
            raise ValueError("its transcript or reputation states are missing")
        transcript.verify(key, run=run.run)
        handed = _handed_server_update(run, rnd, transcript.body)
        if handed is not None and transcript.body.get("server_update") != handed:
            raise ValueError("its transcript names another server update")
        if digest_hex(before) != digest_hex(expected[gid]):
            raise ValueError("it starts from another reputation state")
        if digest_hex(before) != transcript.body.get("reputation_before") or (
            digest_hex(after) != transcript.body.get("reputation_after")
        ):
            raise ValueError("its reputation states are not the ones it signed")
    except (ValueError, VerificationError) as exc:
        fails.add(where, str(exc))
        return ""
    expected[gid] = after
    transcripts[(rnd, gid)] = (transcript, before, after)
    return f"galaxy {gid} not replayed (the global aggregator's fault)"


def _audit_galaxy(
    run: _Run,
    rnd: int,
    gid: int,
    g: dict[str, Any],
    d: Path,
    reference: torch.Tensor | None,
    misbehaviour: dict[int, Any],
    transcripts: _Transcripts,
    expected: dict[int, dict[str, Any]],
    verified: dict[int, dict[str, Any]],
    fails: _Failures,
    counts: dict[str, int],
    members: frozenset[int] | None = None,
    sampled: frozenset[int] | None = None,
    server_update: torch.Tensor | None = None,
    unreplayable: bool = False,
) -> str:
    where = f"round {rnd} galaxy {gid}"
    gd = d / f"galaxy-{gid}"
    try:
        key = run.galaxy_keys[gid]
        leaf = Signed.from_dict(GalaxyLeaf, _json(gd / "leaf.json"))
        leaf.verify(key, run=run.run)
        if leaf.statement.to_dict() != g["leaf"]:
            raise ValueError("not the root the round record names")
        aggregate = None
        if (gd / "aggregate.json").exists():
            aggregate = Signed.from_dict(
                AggregateStatement, _json(gd / "aggregate.json")
            )
            aggregate.verify(key, run=run.run)
        if (None if aggregate is None else aggregate.statement.digest.hex()) != g[
            "aggregate"
        ]:
            raise ValueError("the aggregate is not the one the round record names")
        transcript = before = after = None
        if (gd / "transcript.json").exists():
            transcript = SignedDocument.from_dict(
                _json(gd / "transcript.json"), kind="transcript"
            )
            states = _json(gd / "reputation.json")
            before, after = states["before"], states["after"]
        if (None if transcript is None else transcript.digest().hex()) != g[
            "transcript"
        ]:
            raise ValueError("the transcript is not the one the round record names")
        acks = [Signed.from_dict(Acknowledgement, a) for a in _jsonl(gd / "acks.jsonl")]
        if digest_hex(sorted((a.to_dict() for a in acks), key=canonical_json)) != g.get(
            "acks"
        ):
            raise ValueError("the acknowledgements are not the ones the record names")
    except (OSError, KeyError, TypeError, ValueError, VerificationError) as exc:
        fails.add(where, str(exc))
        return ""
    if g["status"] == "absent" and transcript is None and aggregate is None:
        return ""
    if transcript is not None and server_update is not None:
        # FLTrust: the galaxy keeps the global aggregator's signed statement of
        # the update it was given. Signed, and not the one the record names:
        # the global aggregator equivocated, and the galaxy is not to blame.
        handed = _handed_server_update(run, rnd, transcript.body)
        recorded = str(tensor_digest(server_update))
        if handed is not None and handed != recorded:
            fails.add(
                f"round {rnd} global",
                f"the global aggregator signed two server updates: galaxy {gid} "
                f"was given {handed[:16]}..., the round record names "
                f"{recorded[:16]}...",
            )
            unreplayable = True
    if unreplayable:
        return _hold_to_transcript(
            run, rnd, gid, key, transcript, before, after, expected, transcripts,
            fails,
        )  # fmt: skip
    gr = GalaxyRound(gid, rnd, leaf, transcript, before, after, aggregate, acks)
    ctx = AuditContext(
        run=run.run,
        galaxy_key=key,
        client_keys=run.client_keys,
        spec=run.spec,
        defense=run.config.defense.build(),
        reference=reference,
        server_update=server_update,
        max_update_bytes=run.config.max_update_bytes,
        expected_before=digest_hex(expected[gid]),
        members=members,
        sampled=sampled,
    )
    updates_dir = run.root / "audit" / "updates" / f"{rnd:06d}" / f"galaxy-{gid}"
    claimed = g["status"] == "misbehaved"
    kept = updates_dir.exists()
    keep = run.config.audit.keep_updates
    if not kept and g.get("audit") == "replayed" and rnd > run.last_round - keep:
        # The run keeps the updates of its last rounds: these are gone.
        fails.add(where, f"the updates of a replayed round are missing ({updates_dir})")
    try:
        body, _ = audit_galaxy(gr, ctx)
        counts["checked"] += 1
        if kept:
            updates = {
                c: (updates_dir / f"{c}.pgt1").read_bytes()
                for c in updates_needed(body)
                if (updates_dir / f"{c}.pgt1").exists()
            }
            _, replayed = audit_galaxy(gr, ctx, updates)
            assert replayed is not None
            verified[gid] = replayed
            counts["replayed"] += 1
        elif g.get("audit") == "replayed":
            # The updates are no longer kept; the global aggregator replayed this
            # round (its signed record says so) from the state checked above.
            assert after is not None
            verified[gid] = after
    except Misbehaviour as m:
        if not claimed:
            fails.add(where, f"{m.kind}: {m.detail}")
            return ""
        published = misbehaviour.get(gid)
        if m.kind != g.get("misbehaviour"):
            fails.add(
                f"round {rnd} global",
                f"records {g.get('misbehaviour')!r} for galaxy {gid}; the audit "
                f"finds {m.kind!r}",
            )
        if published is None:
            fails.add(where, "misbehaved, but its misbehaviour record is missing")
        elif published != json.loads(json.dumps(m.to_dict(), default=str)):
            fails.add(where, "the misbehaviour record is not what the audit finds")
        if transcript is not None and before is not None and after is not None:
            try:  # its own signed word: evidence is still held to it
                transcript.verify(key, run=run.run)
                transcripts[(rnd, gid)] = (transcript, before, after)
            except VerificationError:
                pass
        return f"galaxy {gid} misbehaved ({m.kind}), proof verified"
    if claimed:
        fails.add(
            f"round {rnd} global",
            f"says galaxy {gid} misbehaved; its round verifies",
        )
        return ""
    assert after is not None and transcript is not None and before is not None
    expected[gid] = after
    # Only a transcript that verified is what evidence and receipts are held to.
    transcripts[(rnd, gid)] = (transcript, before, after)
    return ""


def _check_evidence(
    run: _Run,
    transcripts: _Transcripts,
    fails: _Failures,
) -> None:
    path = run.root / "evidence.jsonl"
    try:
        records = _jsonl(path)
    except ValueError as exc:
        fails.add("evidence.jsonl", f"unreadable ({exc})")
        return
    seen: set[tuple[int, int, int, str]] = set()
    for i, rec in enumerate(records):
        where = f"evidence line {i + 1}"
        try:
            gid, c, rnd = int(rec["galaxy"]), int(rec["client"]), int(rec["round"])
            where += f" (round {rnd} galaxy {gid} client {c})"
            verify_inline(run.galaxy_keys[gid], "evidence", rec, run=run.run)
            ev = rec["evidence"]
            com = Commitment.from_bytes(bytes.fromhex(ev["leaf"]))
            key = run.client_keys[c]
            verify_commitment_signature(
                key, com, bytes.fromhex(ev["commitment_signature"]), run=run.run
            )
            if "reveal_signature" in ev:
                verify_reveal_signature(
                    key,
                    com,
                    bytes.fromhex(ev["nonce"]),
                    bytes.fromhex(ev["reveal_signature"]),
                    digest=bytes.fromhex(ev["reveal_digest"]),
                    run=run.run,
                )
            t = transcripts.get((rnd, gid))
            if t is not None and rec.get("transcript") != t[0].digest().hex():
                raise ValueError("it is not from the round's transcript")
            seen.add((rnd, gid, c, rec["event"]))
        except (KeyError, TypeError, ValueError, VerificationError) as exc:
            fails.add(where, str(exc))
            continue
    if 4 not in run.config.defense.layers:
        return
    # Every rejection, withholding and change of status a transcript shows has its
    # record (layer 4 writes one for each): none can be dropped unseen.
    changes = {"quarantined": "client_quarantined", "banned": "client_banned"}
    for (rnd, gid), (doc, before, after) in sorted(transcripts.items()):
        if doc.body.get("fallback"):
            continue
        try:
            wanted = [
                (
                    e["client"],
                    {"withheld": "reveal_withheld", "rejected": "reveal_rejected"}[
                        e["fate"]
                    ],
                )
                for e in doc.body["clients"]
                if e["fate"] in ("withheld", "rejected")
            ]
            for c, rec in after["clients"].items():
                old = before["clients"].get(c, {}).get("status", "active")
                if rec["status"] != old:
                    wanted.append(
                        (int(c), changes.get(rec["status"], "client_released"))
                    )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            fails.add(
                f"round {rnd} galaxy {gid}",
                f"its transcript cannot be held against the evidence ({exc!r})",
            )
            continue
        for c, event in wanted:
            if (rnd, gid, c, event) not in seen:
                fails.add(
                    f"round {rnd} galaxy {gid}",
                    f"client {c}'s {event} record is missing",
                )


def _check_receipts(
    run: _Run,
    transcripts: _Transcripts,
    fails: _Failures,
) -> None:
    path = run.root / "receipts.jsonl"
    if not path.exists():
        return
    try:
        lines = _jsonl(path)
    except ValueError as exc:
        fails.add("receipts.jsonl", f"unreadable ({exc})")
        return
    have = set()
    for i, line in enumerate(lines):
        try:
            receipt = Receipt.from_dict(line["receipt"])
            verify_receipt(
                receipt, global_key=run.global_key, run=run.run, round=line["round"]
            )
            if receipt.commitment.client_id != line["client"]:
                raise ValueError("a receipt for another client")
            have.add((line["round"], line["client"]))
        except (KeyError, TypeError, ValueError, VerificationError) as exc:
            fails.add(f"receipt line {i + 1}", str(exc))
    for (rnd, _), (t, _, _) in sorted(transcripts.items()):
        entries = t.body.get("clients")
        for e in entries if isinstance(entries, list) else ():
            if (
                isinstance(e, dict)
                and "nonce" in e
                and (rnd, e.get("client")) not in have
            ):
                fails.add(
                    f"round {rnd} client {e['client']}",
                    "revealed, but its receipt is missing",
                )

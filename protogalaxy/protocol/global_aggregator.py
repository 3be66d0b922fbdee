"""The global aggregator's round state machine.

``leaves``: collect galaxy roots -> build the global tree, sign the round head ->
``aggregates``: collect galaxy aggregates, each bound to the root the galaxy sent and
to its signed transcript -> audit the galaxies, run layer 5, combine, apply the
update with the server optimizer, append the signed round record to the audit log
-> next round (model version r + 1).

Nothing a galaxy says is taken on the caller's word: a root, an abstention, an
aggregate, a transcript or an acknowledgement for galaxy ``g`` counts only when
galaxy ``g``'s provisioned key signed it in this run. An aggregate's weight comes
from its signed statement (the updates the galaxy aggregated, at most its committed
tree size, at most its clients), its values must be float32 of the model's shape and
hash to the signed digest, and a step that is not finite is never applied.

Audits (:mod:`protogalaxy.protocol.audit`). Every round, every galaxy's transcript is
checked against what it signed and against the acknowledgements its clients
forwarded; the galaxies drawn for a replay (all by default, or a fraction drawn
after the aggregates arrived, from a keyed hash the galaxies cannot predict) are
replayed from their revealed updates. A galaxy caught lying has its contribution
excluded, is isolated from the next round on with the proof logged as a
``galaxy_misbehaved`` event, and its clients move to the other galaxies with the
reputations the last verified round left them (:mod:`protogalaxy.protocol.
assignment`): no client's reputation changes because of the lie. A galaxy that
sends nothing at all only misses the round.

The server step is FedAvgM (Hsu, Qi, Brown 2019): ``v <- beta v + g``,
``w <- w + eta v`` on the combined aggregate ``g``; ``beta = 0`` is plain FedAvg.
"""

from __future__ import annotations

import copy
import hmac
import logging
import random
import struct
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.artefacts import GalaxyArtefacts
from protogalaxy.crypto.audit import AuditLog, record_round
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.heads import SignedRoundHead, sign_round_head
from protogalaxy.crypto.identity import SigningKey, VerifyKey
from protogalaxy.crypto.merkle import InclusionProof
from protogalaxy.crypto.statements import (
    Abstention,
    Acknowledgement,
    AggregateStatement,
    Signed,
    SignedDocument,
    aggregate_digest,
    canonical_json,
    sign_document,
)
from protogalaxy.crypto.trees import GalaxyLeaf, GlobalTree
from protogalaxy.defense.pipeline import GlobalDefense, GlobalDefenseReport
from protogalaxy.learning.server import ServerStep
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.audit import (
    AuditContext,
    GalaxyRound,
    Misbehaviour,
    audit_galaxy,
    carry_over,
    updates_needed,
)
from protogalaxy.protocol.checkpoint import Checkpoint
from protogalaxy.protocol.galaxy import Rejected, UnknownClient, WrongPhase
from protogalaxy.protocol.sampling import Sampling
from protogalaxy.protocol.transcript import digest_hex, tensor_digest
from protogalaxy.spec import UpdateSpec

__all__ = ["AuditSettings", "GlobalAggregator", "GlobalRoundResult", "keyring_digest"]

_log = logging.getLogger("protogalaxy.global")


@dataclass
class AuditSettings:
    """How the global aggregator audits the galaxies.

    ``enabled``: check transcripts and replay galaxies at all (off only to show
    what the audit catches); ``fraction``: of the galaxies with a transcript, the
    share replayed each round; ``client_keys``: the clients' provisioned keys;
    ``spec``: the model's tensors (layer 1 of the replay).
    """

    enabled: bool = True
    fraction: float = 1.0
    client_keys: Mapping[int, VerifyKey] = field(default_factory=dict)
    spec: UpdateSpec | None = None
    max_update_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")


@dataclass
class GlobalRoundResult:
    round: int
    head: SignedRoundHead
    report: GlobalDefenseReport
    applied: bool
    update_norm: float
    #: the signed round record appended to the audit log
    record: SignedDocument | None = None
    #: galaxies caught misbehaving this round (isolated from the next)
    misbehaved: list[Misbehaviour] = field(default_factory=list)
    #: the round's server update (FLTrust), as the signed record names it
    server_update: torch.Tensor | None = None


@dataclass
class _RoundState:
    round: int
    phase: str = "leaves"
    leaves: dict[int, GalaxyLeaf] = field(default_factory=dict)
    signed_leaves: dict[int, Signed[GalaxyLeaf]] = field(default_factory=dict)
    abstained: set[int] = field(default_factory=set)
    tree: GlobalTree | None = None
    head: SignedRoundHead | None = None
    aggregates: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    statements: dict[int, Signed[AggregateStatement]] = field(default_factory=dict)
    #: galaxy -> (signed transcript, reputation state before, after)
    transcripts: dict[int, tuple[SignedDocument, dict[str, Any], dict[str, Any]]] = (
        field(default_factory=dict)
    )
    #: galaxy -> acknowledgements its clients forwarded this round
    acks: dict[int, list[Signed[Acknowledgement]]] = field(default_factory=dict)
    #: the audit's draw (galaxy -> clients whose updates its replay needs), made
    #: once; transcripts close with it
    drawn: dict[int, list[int]] | None = None
    #: the update on the global aggregator's root dataset (FLTrust), if any
    server_update: torch.Tensor | None = None

    def artefacts_of(self, galaxy: int, leaf: Signed[GalaxyLeaf]) -> GalaxyArtefacts:
        """What ``galaxy`` signed this round, with the acknowledgements its
        clients forwarded: its part of the run's artefacts."""
        t = self.transcripts.get(galaxy)
        st = self.statements.get(galaxy)
        return GalaxyArtefacts(
            leaf=leaf.to_dict(),
            aggregate=None if st is None else st.to_dict(),
            transcript=None if t is None else t[0],
            before=None if t is None else t[1],
            after=None if t is None else t[2],
            acks=[a.to_dict() for a in self.acks.get(galaxy, [])],
        )


class GlobalAggregator:
    """The global round logic. ``key`` signs the round heads and records;
    ``galaxy_keys`` are the galaxies' provisioned public keys; ``assignment`` places
    the clients in the galaxies (no galaxy's tree, so no weight, can be larger than
    its clients); ``run`` is the run every signature belongs to; ``audit`` says how
    the galaxies are audited."""

    def __init__(
        self,
        *,
        key: SigningKey,
        galaxy_keys: Mapping[int, VerifyKey],
        assignment: Assignment,
        run: str,
        params: torch.Tensor,
        defense: GlobalDefense,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server: ServerStep | None = None,
        sampling: Sampling | None = None,
        audit_log: AuditLog | None = None,
        audit: AuditSettings | None = None,
        config_digest: str | None = None,
    ) -> None:
        if not galaxy_keys:
            raise ValueError("at least one galaxy is needed")
        #: the global step (FedAvgM with server_lr and server_momentum unless
        #: ``server`` says otherwise)
        self.server = server or ServerStep("fedavgm", server_lr, server_momentum)
        #: who takes part in each round: a transcript with anyone else fails
        self.sampling = sampling or Sampling()
        self._members_cache: tuple[frozenset[int] | None, dict[int, list[int]]] = (
            None,
            {},
        )
        if set(galaxy_keys) != set(range(assignment.num_galaxies)):
            raise ValueError("galaxy_keys must name exactly the assignment's galaxies")
        self.key = key
        self.run = run
        self.galaxy_keys = dict(galaxy_keys)
        self.assignment = assignment
        self.audit = audit or AuditSettings(enabled=False)
        if self.audit.enabled and self.audit.spec is None:
            raise ValueError("auditing needs the model's spec")
        #: galaxy -> the reputation state its next round must start from
        self.expected_state: dict[int, dict[str, Any]] = {
            g: {"galaxy": g, "clients": {}} for g in galaxy_keys
        }
        #: galaxy -> the last reputation state a replay verified
        self.verified_state: dict[int, dict[str, Any]] = {}
        #: galaxy -> why and when it was isolated
        self.isolated: dict[int, dict[str, Any]] = {}
        self._assignment_doc: SignedDocument | None = None
        #: what was received in the round finished last (for its artefacts)
        self.finished: _RoundState | None = None
        self.galaxies = sorted(self.galaxy_keys)
        #: what every round record binds the run to: the configuration's digest and
        #: the keyrings the galaxies and clients were checked against
        self.binding = {
            "config": config_digest,
            "galaxy_keys": keyring_digest(self.galaxy_keys),
            "client_keys": keyring_digest(self.audit.client_keys),
        }
        self.params = params.detach().clone()
        self.defense = defense
        self.audit_log = (
            audit_log
            if audit_log is not None
            else AuditLog(trusted_key=key.public_key, run=run)
        )
        self.velocity = torch.zeros_like(self.params)
        #: FedAdam's and FedYogi's second moment (empty for FedAvgM)
        self.second_moment = self.server.initial_second_moment(self.params)
        self.direction_sum = torch.zeros_like(self.params)
        self.direction_count = 0
        self._state = _RoundState(0)

    @property
    def round(self) -> int:
        return self._state.round

    @property
    def phase(self) -> str:
        return self._state.phase

    @property
    def leaves(self) -> dict[int, GalaxyLeaf]:
        """The galaxy leaves received this round."""
        return dict(self._state.leaves)

    @property
    def round_state(self) -> _RoundState:
        """What the current round has received so far (read it, do not change it)."""
        return self._state

    @property
    def abstained(self) -> set[int]:
        """The galaxies that signed an abstention this round."""
        return set(self._state.abstained)

    @property
    def aggregates(self) -> dict[int, tuple[torch.Tensor, int]]:
        """The galaxy aggregates received this round."""
        return dict(self._state.aggregates)

    @property
    def head(self) -> SignedRoundHead | None:
        """This round's signed head, once the leaves are closed."""
        return self._state.head

    def set_server_update(self, round: int, update: torch.Tensor) -> SignedDocument:
        """This round's update on the global aggregator's own root dataset: what
        FLTrust's trust scores are measured against. Returns it signed (``run``,
        ``round``, its digest) for the galaxies
        (:meth:`GalaxyAggregator.set_server_update`): each keeps the statement in
        its transcript, so a global aggregator that hands out one update and
        records another is caught by its own signature."""
        if self._state.round != round:
            raise WrongPhase(
                f"global aggregator is at round {self._state.round}, not {round}"
            )
        flat = update.detach().reshape(-1).to(torch.float32).cpu()
        if flat.numel() != self.params.numel() or not bool(torch.isfinite(flat).all()):
            raise ValueError(
                f"the server update must be {self.params.numel()} finite values"
            )
        self._state.server_update = flat
        return sign_document(
            self.key,
            "server-update",
            {"run": self.run, "round": round, "server_update": tensor_digest(flat)},
            run=self.run,
        )

    @property
    def server_update(self) -> torch.Tensor | None:
        """This round's server update (None: the round has none)."""
        return self._state.server_update

    @property
    def reference_direction(self) -> torch.Tensor | None:
        """Running mean of the accepted global aggregates (None before the first)."""
        if self.direction_count == 0:
            return None
        return self.direction_sum / self.direction_count

    def _require(self, round: int, phase: str) -> None:
        if (self._state.round, self._state.phase) != (round, phase):
            raise WrongPhase(
                f"global aggregator is at round {self._state.round} "
                f"{self._state.phase}, not round {round} {phase}"
            )

    def _authenticate_as(
        self, galaxy: int, signed: Signed[Any] | SignedDocument
    ) -> None:
        """Raise ``Rejected("bad_signature")`` (401) unless galaxy ``galaxy``'s key
        signed ``signed`` in this run; ``unknown_client`` for a galaxy not taking
        part, ``isolated`` (403) for one isolated for misbehaving."""
        key = self.galaxy_keys.get(galaxy)
        if key is None:
            raise Rejected("unknown_client", f"galaxy {galaxy} is not configured")
        if galaxy in self.isolated:
            raise Rejected(
                "isolated",
                f"galaxy {galaxy} is isolated since round "
                f"{self.isolated[galaxy]['round']}",
            )
        try:
            signed.verify(key, run=self.run)
        except SignatureError as exc:
            _log.error(
                "a statement for galaxy %d is not signed by its key: %s", galaxy, exc
            )
            raise Rejected(
                "bad_signature", f"not signed by galaxy {galaxy}'s key: {exc}"
            ) from None

    def submit_leaf(self, signed: Signed[GalaxyLeaf]) -> bool:
        """A galaxy's signed root and size for this round.

        Returns True when accepted, False for an identical resend (also after the
        leaves closed: a restarted galaxy resends what it sent)."""
        leaf = signed.statement
        if (
            leaf.round == self._state.round
            and self._state.leaves.get(leaf.galaxy_id) == leaf
        ):
            self._authenticate_as(leaf.galaxy_id, signed)
            return False
        self._require(leaf.round, "leaves")
        self._authenticate_as(leaf.galaxy_id, signed)
        size = self.assignment.sizes()[leaf.galaxy_id]
        if leaf.tree_size > size:
            _log.error(
                "galaxy %d claims a tree of %d leaves; it has %d clients",
                leaf.galaxy_id,
                leaf.tree_size,
                size,
            )
            raise Rejected(
                "tree_too_large",
                f"galaxy {leaf.galaxy_id} has {size} clients; a tree of "
                f"{leaf.tree_size} leaves cannot be",
            )
        if leaf.galaxy_id in self._state.abstained:
            raise Rejected(
                "duplicate", f"galaxy {leaf.galaxy_id} abstained from this round"
            )
        known = self._state.leaves.get(leaf.galaxy_id)
        if known is not None and known != leaf:
            _log.error("galaxy %d sent a second, different root", leaf.galaxy_id)
            raise Rejected(
                "duplicate", f"galaxy {leaf.galaxy_id} already sent another root"
            )
        self._state.leaves[leaf.galaxy_id] = leaf
        self._state.signed_leaves[leaf.galaxy_id] = signed
        return True

    def submit_abstention(self, signed: Signed[Abstention]) -> None:
        """A galaxy's signed word that it has no commitments this round: the round
        need not wait for its root."""
        a = signed.statement
        self._require(a.round, "leaves")
        self._authenticate_as(a.galaxy_id, signed)
        if a.galaxy_id in self._state.leaves:
            raise Rejected(
                "duplicate", f"galaxy {a.galaxy_id} already sent a root this round"
            )
        self._state.abstained.add(a.galaxy_id)

    def close_leaves(
        self,
        round: int,
        *,
        timestamp_ms: int | None = None,
        persist: Callable[[dict[str, Any]], None] | None = None,
    ) -> SignedRoundHead:
        """Build the global tree and sign the round head.

        ``persist`` gets the :meth:`signed_round` document before the head is
        in force; if it raises, the round stays open to roots, as if the head
        had not been signed (it was handed to no one)."""
        self._require(round, "leaves")
        if not self._state.leaves:
            raise WrongPhase(f"round {round}: no galaxy sent a root")
        tree = GlobalTree(self._state.leaves.values(), round=round)
        ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        head = sign_round_head(self.key, tree.head(ts, run=self.run))
        if persist is not None:
            persist(self._signed_round_doc(head))
        self._state.tree = tree
        self._state.head = head
        self._state.phase = "aggregates"
        return head

    def skip_to(self, round: int) -> None:
        """Start ``round`` now, leaving the rounds before it unplayed: after a
        checkpoint loss, past every round whose head was already signed, so that
        no round ever gets a second head."""
        if round < self.round:
            raise ValueError(f"cannot go back from round {self.round} to {round}")
        self._state = _RoundState(round)

    def signed_round(self) -> dict[str, Any] | None:
        """The current round's signed roots and the head signed over them (None
        before :meth:`close_leaves`). A service stores it before it hands the
        head out: after a restart :meth:`resume_signed_round` takes it back, so
        the aggregator never signs a second, different head for a round."""
        head = self._state.head
        return None if head is None else self._signed_round_doc(head)

    def _signed_round_doc(self, head: SignedRoundHead) -> dict[str, Any]:
        st = self._state
        return {
            "round": st.round,
            "leaves": [st.signed_leaves[g].to_dict() for g in sorted(st.leaves)],
            "abstained": sorted(st.abstained),
            "head": head.to_dict(),
        }

    def resume_signed_round(self, doc: dict[str, Any]) -> None:
        """Take back the head this aggregator signed for the current round before
        a restart (see :meth:`signed_round`): the same roots, the same head, the
        round at its aggregates phase. Raises ``ValueError`` for a document that
        is not exactly that (another round, another key, roots that do not make
        that head)."""
        self._require(doc["round"], "leaves")
        head = SignedRoundHead.from_dict(doc["head"])
        try:
            head.verify(self.key.public_key, run=self.run)
        except SignatureError as exc:
            raise ValueError(f"stored head of round {doc['round']}: {exc}") from None
        leaves: dict[int, Signed[GalaxyLeaf]] = {}
        for raw in doc["leaves"]:
            signed = Signed.from_dict(GalaxyLeaf, raw)
            self._authenticate_as(signed.statement.galaxy_id, signed)
            leaves[signed.statement.galaxy_id] = signed
        tree = GlobalTree((s.statement for s in leaves.values()), round=self.round)
        if (tree.root, tree.size, head.head.round) != (
            head.head.root,
            head.head.tree_size,
            self.round,
        ):
            raise ValueError(f"stored roots of round {self.round} do not make its head")
        st = self._state
        st.signed_leaves = leaves
        st.leaves = {g: s.statement for g, s in leaves.items()}
        st.abstained = {int(g) for g in doc.get("abstained", [])}
        st.tree, st.head, st.phase = tree, head, "aggregates"

    def skip_round(self, round: int) -> None:
        """End a round that no galaxy sent a root for: nothing is applied or logged."""
        self._require(round, "leaves")
        if self._state.leaves:
            raise WrongPhase(f"round {round} has roots; close it with close_leaves")
        _log.warning("round %d skipped: no galaxy had commitments", round)
        self._state = _RoundState(round + 1)

    def proof_for(self, galaxy: int) -> InclusionProof:
        if self._state.tree is None:
            raise WrongPhase("the round head is not signed yet")
        try:
            return self._state.tree.proof_for(galaxy)
        except KeyError:
            raise UnknownClient(
                f"galaxy {galaxy} has no root in round {self._state.round}"
            ) from None

    def submit_aggregate(
        self, signed: Signed[AggregateStatement], aggregate: torch.Tensor
    ) -> bool:
        """Accept a galaxy's aggregate with its signed statement: bound to the root
        and tree size it committed to, weighted by the number of updates it says it
        aggregated (1 to its tree size), float32 of the model's shape, finite, and
        hashing to the signed digest.

        Returns True when accepted, False for an identical resubmission; a
        conflicting resubmission is rejected and logged as tampering.
        """
        st = signed.statement
        galaxy, round = st.galaxy_id, st.round
        self._require(round, "aggregates")
        self._authenticate_as(galaxy, signed)
        leaf = self._state.leaves.get(galaxy)
        if leaf is None:
            raise Rejected(
                "unknown_client", f"galaxy {galaxy} has no root in round {round}"
            )
        if not hmac.compare_digest(leaf.root, st.root) or leaf.tree_size != (
            st.tree_size
        ):
            raise Rejected(
                "commitment_mismatch",
                f"aggregate of galaxy {galaxy} is bound to another root or size",
            )
        if aggregate.dtype != torch.float32:
            raise Rejected(
                "dtype",
                f"aggregate of galaxy {galaxy} is {aggregate.dtype}; it must be "
                "torch.float32",
            )
        if aggregate.shape != self.params.shape:
            raise Rejected(
                "shape",
                f"aggregate of galaxy {galaxy} has shape {tuple(aggregate.shape)}, "
                f"the model {tuple(self.params.shape)}",
            )
        values = aggregate.contiguous().numpy()
        if not hmac.compare_digest(aggregate_digest(values.data), st.digest):
            raise Rejected(
                "commitment_mismatch",
                f"aggregate of galaxy {galaxy} does not hash to its signed digest",
            )
        if not bool(torch.isfinite(aggregate).all()):
            raise Rejected(
                "non_finite", f"aggregate of galaxy {galaxy} has non-finite values"
            )
        weight = st.weight
        known = self._state.aggregates.get(galaxy)
        if known is not None:
            if torch.equal(known[0], aggregate) and known[1] == weight:
                return False
            _log.error(
                "galaxy %d round %d: conflicting aggregate (tampering)", galaxy, round
            )
            raise Rejected(
                "duplicate", f"galaxy {galaxy} already sent a different aggregate"
            )
        self._state.aggregates[galaxy] = (aggregate.detach().clone(), int(weight))
        self._state.statements[galaxy] = signed
        return True

    def submit_transcript(
        self,
        transcript: SignedDocument,
        before: dict[str, Any],
        after: dict[str, Any],
    ) -> bool:
        """A galaxy's signed transcript of this round, with its reputation state
        before and after the round (checked when the round is finished). True when
        taken, False for an identical resend."""
        body = transcript.body
        galaxy, round = body.get("galaxy"), body.get("round")
        if transcript.kind != "transcript" or not isinstance(galaxy, int):
            raise Rejected("malformed", "not a galaxy transcript")
        if not isinstance(round, int):
            raise Rejected("malformed", "a transcript names its round")
        self._require(round, "aggregates")
        self._authenticate_as(galaxy, transcript)
        if self._state.drawn is not None:
            # After the draw a transcript could choose not to be replayed: it
            # counts as missing (a galaxy sends it before its aggregate).
            raise WrongPhase(
                f"round {round}: transcripts closed when the audit drew its sample"
            )
        if galaxy not in self._state.leaves:
            raise Rejected(
                "unknown_client", f"galaxy {galaxy} has no root in round {round}"
            )
        known = self._state.transcripts.get(galaxy)
        if known is not None:
            if known[0].digest() == transcript.digest():
                return False
            raise Rejected("duplicate", f"galaxy {galaxy} sent another transcript")
        self._state.transcripts[galaxy] = (
            transcript,
            copy.deepcopy(before),
            copy.deepcopy(after),
        )
        return True

    def submit_ack(self, signed: Signed[Acknowledgement]) -> bool:
        """An acknowledgement a galaxy signed for a client's reveal, forwarded by
        the client: the galaxy's transcript must then take that reveal. True when
        new, False for a resend."""
        st = signed.statement
        if st.round != self._state.round:
            raise WrongPhase(
                f"acknowledgement of round {st.round}; the round is {self._state.round}"
            )
        self._authenticate_as(st.galaxy_id, signed)
        acks = self._state.acks.setdefault(st.galaxy_id, [])
        if signed in acks:
            return False
        if sum(1 for a in acks if a.statement.client_id == st.client_id) >= 2:
            raise Rejected("duplicate", f"client {st.client_id} already forwarded")
        acks.append(signed)
        return True

    def audit_targets(self, round: int) -> dict[int, list[int]]:
        """The galaxies drawn for a replay this round, with the clients whose
        revealed updates each replay needs. Drawn once the aggregates are in, from
        a hash keyed with the global aggregator's private key over the round and
        the aggregates: the galaxies cannot know beforehand which are drawn."""
        self._require(round, "aggregates")
        if not self.audit.enabled:
            return {}
        if self._state.drawn is not None:
            return {g: list(c) for g, c in self._state.drawn.items()}
        # Every galaxy that sent anything after its root is a candidate, with a
        # transcript or not (one without is caught as missing, drawn or not).
        candidates = sorted(
            g
            for g in self._state.leaves
            if g in self._state.statements or g in self._state.transcripts
        )
        k = round_half_up(self.audit.fraction * len(candidates))
        if k < len(candidates):
            seed = hmac.digest(
                self.key.to_bytes(),
                b"protogalaxy/v1/audit-sample\x00"
                + struct.pack("<Q", round)
                + b"".join(
                    self._state.statements[g].statement.digest
                    for g in sorted(self._state.statements)
                ),
                "sha256",
            )
            candidates = sorted(random.Random(seed).sample(candidates, k))
        out: dict[int, list[int]] = {}
        for g in candidates:
            t = self._state.transcripts.get(g)
            try:
                out[g] = [] if t is None else updates_needed(t[0].body)
            except Exception:  # a malformed transcript: the check will say so
                out[g] = []
        self._state.drawn = out
        return {g: list(c) for g, c in out.items()}

    def finish_round(
        self,
        round: int,
        *,
        updates: Mapping[int, Mapping[int, bytes]] | None = None,
        unreachable: Collection[int] = (),
    ) -> GlobalRoundResult:
        """Audit, layer 5, combine, apply, log; then open the next round.

        ``updates``: for the galaxies drawn by :meth:`audit_targets`, the revealed
        updates their replay needs (``{galaxy: {client: body}}``), as each galaxy
        served them; a drawn galaxy missing here failed to serve them.

        ``unreachable``: drawn galaxies that could not be asked at all (no answer
        within the fetch's time: a restart, a network fault). A fault is not proof
        of misbehaviour, so such a galaxy is not isolated; but its aggregate was
        not verified, so it is left out of this round (status ``unaudited``) and
        its transcript is checked without the replay."""
        self._require(round, "aggregates")
        head = self._state.head
        assert head is not None
        drawn = set(self._state.drawn or {})
        unaudited = {g for g in unreachable if g in drawn}
        misbehaved, audited, verified, expected = self._audit(round, updates, unaudited)
        aggregates = {
            g: v
            for g, v in self._state.aggregates.items()
            if g not in misbehaved and g not in unaudited
        }
        report = self.defense.run(
            aggregates,
            reference_direction=self.reference_direction,
            model_norm=float(
                torch.linalg.vector_norm(self.params, dtype=torch.float64)
            ),
        )
        applied = False
        norm = 0.0
        if report.aggregate is not None:
            g = report.aggregate.to(self.params.dtype)
            params, velocity, moment = self.server.step(
                self.params, g, self.velocity, self.second_moment
            )
            if all(
                bool(torch.isfinite(t).all()) for t in (g, velocity, moment, params)
            ):
                self.velocity, self.params = velocity, params
                self.second_moment = moment
                self.direction_sum += g
                self.direction_count += 1
                norm = float(torch.linalg.vector_norm(g))
                applied = True
            else:  # never publish a model that is not finite
                _log.error("round %d: the step is not finite; not applied", round)
        # Everything above only computed; the state changes from here on.
        self.verified_state.update(verified)
        self.expected_state.update(expected)
        for m in misbehaved.values():
            self._isolate(m)
        record = self._record(round, head, report, misbehaved, audited, applied)
        self.audit_log.append(record)
        self.finished = self._state
        self._state = _RoundState(round + 1)
        return GlobalRoundResult(
            round,
            head,
            report,
            applied,
            norm,
            record,
            list(misbehaved.values()),
            self.finished.server_update,
        )

    def _members(self) -> dict[int, list[int]]:
        """Each galaxy's clients under the placement now (computed once a
        placement)."""
        key = self.assignment.isolated
        if self._members_cache[0] != key:
            self._members_cache = (key, self.assignment.members())
        return self._members_cache[1]

    def _sampled(self, round: int, galaxy: int) -> frozenset[int] | None:
        """Round ``round``'s sample of ``galaxy``'s clients (None: every one)."""
        if self.sampling.everyone:
            return None
        return self.sampling.clients(self._members().get(galaxy, []), round, galaxy)

    def _audit(
        self,
        round: int,
        updates: Mapping[int, Mapping[int, bytes]] | None,
        unreachable: Collection[int] = (),
    ) -> tuple[
        dict[int, Misbehaviour],
        dict[int, str],
        dict[int, dict[str, Any]],
        dict[int, dict[str, Any]],
    ]:
        """Check every galaxy's round, replay the drawn ones: who misbehaved, how
        each galaxy was audited (``checked`` or ``replayed``), and the reputation
        states to take on (verified by a replay; expected next). Changes nothing:
        the caller applies it once the whole round is computed."""
        misbehaved: dict[int, Misbehaviour] = {}
        audited: dict[int, str] = {}
        verified: dict[int, dict[str, Any]] = {}
        expected: dict[int, dict[str, Any]] = {}
        if not self.audit.enabled:
            return misbehaved, audited, verified, expected
        assert self.audit.spec is not None
        drawn = self._state.drawn or {}
        served = updates or {}
        for g in sorted(self._state.leaves):
            if g not in self._state.statements and g not in self._state.transcripts:
                continue  # sent nothing after its root: it only misses the round
            t = self._state.transcripts.get(g)
            gr = GalaxyRound(
                g,
                round,
                self._state.signed_leaves[g],
                None if t is None else t[0],
                None if t is None else t[1],
                None if t is None else t[2],
                self._state.statements.get(g),
                list(self._state.acks.get(g, [])),
            )
            ctx = AuditContext(
                run=self.run,
                galaxy_key=self.galaxy_keys[g],
                client_keys=self.audit.client_keys,
                spec=self.audit.spec,
                defense=self.defense.config,
                reference=self.reference_direction,
                server_update=self._state.server_update,
                max_update_bytes=self.audit.max_update_bytes,
                expected_before=digest_hex(self.expected_state[g]),
                members=frozenset(self._members().get(g, ())),
                sampled=self._sampled(round, g),
            )
            replayed = (g in drawn or g in served) and g not in unreachable
            try:
                _, after = audit_galaxy(
                    gr, ctx, served.get(g, {}) if replayed else None
                )
            except Misbehaviour as m:
                misbehaved[g] = m
                _log.error("galaxy_misbehaved", extra={"event_record": m.to_dict()})
                continue
            audited[g] = (
                "unreachable"
                if g in unreachable
                else ("replayed" if replayed else "checked")
            )
            if g in unreachable:
                _log.error(
                    "galaxy_unaudited",
                    extra={
                        "event_record": {
                            "event": "galaxy_unaudited",
                            "galaxy": g,
                            "round": round,
                            "why": "drawn for a replay and unreachable",
                        }
                    },
                )
            if after is not None:
                verified[g] = after
            assert gr.after is not None
            expected[g] = copy.deepcopy(gr.after)
        return misbehaved, audited, verified, expected

    def _isolate(self, m: Misbehaviour) -> None:
        """Isolate ``m.galaxy`` from the next round on; its clients move to the
        other galaxies with the reputation records the galaxy's last verified round
        left them (not the ones of the round it lied in). The last galaxy is never
        isolated (its contribution is still excluded from the round, and its
        misbehaviour on record): the run needs a galaxy to go on."""
        if self.assignment.active() == [m.galaxy]:
            _log.error(
                "galaxy %d misbehaved but is the last one active: not isolated",
                m.galaxy,
            )
            return
        self.isolated[m.galaxy] = {
            "round": m.round,
            "kind": m.kind,
            "detail": m.detail,
        }
        self.assignment = carry_over(
            self.assignment, m.galaxy, self.expected_state, self.verified_state
        )
        self._assignment_doc = None

    def assignment_document(self) -> SignedDocument:
        """The signed placement of the clients (isolated galaxies, the round it
        holds from) and, for every client that moved, the reputation record its new
        galaxy starts it with. Galaxies and clients verify it with the pinned key."""
        if self._assignment_doc is None:
            adopted: dict[str, Any] = {}
            for c in self.assignment.moved():
                state = self.expected_state[self.assignment.galaxy_of(c)]
                record = state["clients"].get(str(c))
                if record is not None:
                    adopted[str(c)] = copy.deepcopy(record)
            self._assignment_doc = sign_document(
                self.key,
                "assignment",
                {
                    "run": self.run,
                    "round": self._state.round,
                    "assignment": self.assignment.to_dict(),
                    "isolated": {str(g): v for g, v in sorted(self.isolated.items())},
                    "adopted": adopted,
                },
                run=self.run,
            )
        return self._assignment_doc

    def _record(
        self,
        round: int,
        head: SignedRoundHead,
        report: GlobalDefenseReport,
        misbehaved: Mapping[int, Misbehaviour],
        audited: Mapping[int, str],
        applied: bool,
    ) -> SignedDocument:
        """The signed round record: what happened to every galaxy, the model after."""
        galaxies: dict[str, Any] = {}
        for g in self.galaxies:
            st = self._state.statements.get(g)
            t = self._state.transcripts.get(g)
            if g in misbehaved:
                status = "misbehaved"
            elif audited.get(g) == "unreachable":
                status = "unaudited"  # drawn, not replayable: left out
            elif g in report.excluded:
                status = "excluded"
            elif g in report.accepted:
                status = "clipped" if g in report.clipped else "aggregated"
            elif g in self._state.abstained:
                status = "abstained"
            elif g in self._state.leaves:
                status = "absent"  # a root, then nothing in time
            elif g in self.isolated and g not in misbehaved:
                status = "isolated"
            else:
                status = "absent"
            galaxies[str(g)] = {
                "status": status,
                "leaf": None
                if g not in self._state.leaves
                else self._state.leaves[g].to_dict(),
                "transcript": None if t is None else t[0].digest().hex(),
                "aggregate": None if st is None else st.statement.digest.hex(),
                "weight": None if st is None else st.statement.weight,
                "clip": report.clipped.get(g),
                "audit": audited.get(g),
                "acks": digest_hex(
                    sorted(
                        (a.to_dict() for a in self._state.acks.get(g, [])),
                        key=canonical_json,
                    )
                ),
                "misbehaviour": None if g not in misbehaved else misbehaved[g].kind,
            }
        body = {
            "run": self.run,
            "round": round,
            "head": head.to_dict(),
            "galaxies": galaxies,
            "isolated": sorted(self.isolated),
            "applied": applied,
            "model": tensor_digest(self.params),
            "binding": self.binding,
            "timestamp_ms": time.time_ns() // 1_000_000,
        }
        if self._state.server_update is not None:
            # what FLTrust measured trust against, signed: an auditor takes the
            # published tensor only when its digest is this one
            body["server_update"] = tensor_digest(self._state.server_update)
        return sign_document(self.key, "round-record", body, run=self.run)

    def checkpoint(self) -> Checkpoint:
        """Everything needed to resume at :attr:`round`: model, server optimizer,
        reference direction, galaxy reputations and the audit log."""
        log = torch.frombuffer(bytearray(self.audit_log.to_bytes()), dtype=torch.uint8)
        return Checkpoint(
            self._state.round,
            {
                "direction_count": self.direction_count,
                "server_optimizer": self.server.kind,
                "galaxy_screen": self.defense.screen.state_dict(),
                "galaxies": self.galaxies,
                "run": self.run,
                "signer": self.key.public_key.to_bytes().hex(),
                "assignment": self.assignment.to_dict(),
                "isolated": {str(g): v for g, v in self.isolated.items()},
                "expected_state": {str(g): v for g, v in self.expected_state.items()},
                "verified_state": {str(g): v for g, v in self.verified_state.items()},
            },
            {
                "params": self.params.clone(),
                "velocity": self.velocity.clone(),
                "second_moment": self.second_moment.clone(),
                "direction_sum": self.direction_sum.clone(),
                "audit_log": log,
            },
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Resume from ``checkpoint``; the round it was taken at starts afresh."""
        meta = checkpoint.meta
        if meta["signer"] != self.key.public_key.to_bytes().hex():
            raise ValueError("checkpoint was written by another global aggregator key")
        if meta.get("run") != self.run:
            raise ValueError(
                f"checkpoint is of run {meta.get('run')!r}, not {self.run!r}"
            )
        if meta["galaxies"] != self.galaxies:
            raise ValueError(
                f"checkpoint is for galaxies {meta['galaxies']}, not {self.galaxies}"
            )
        t = checkpoint.tensors
        if t["params"].shape != self.params.shape:
            raise ValueError("checkpoint model has another shape")
        self.params = t["params"].clone()
        self.velocity = t["velocity"].clone()
        # A checkpoint of an older version (FedAvgM only) holds no second moment.
        moment = t.get("second_moment")
        if moment is None or moment.shape != self.second_moment.shape:
            moment = self.server.initial_second_moment(self.params)
        self.second_moment = moment.clone()
        saved_kind = meta.get("server_optimizer", "fedavgm")
        if saved_kind != self.server.kind:
            # Another optimizer's moments mean something else: start them afresh.
            _log.warning(
                "checkpoint of round %d was taken with server optimizer %s, this run "
                "uses %s: its moments start afresh",
                checkpoint.round,
                saved_kind,
                self.server.kind,
            )
            self.velocity = torch.zeros_like(self.params)
            self.second_moment = self.server.initial_second_moment(self.params)
        self.direction_sum = t["direction_sum"].clone()
        self.direction_count = int(meta["direction_count"])
        self.defense.screen.load_state_dict(meta["galaxy_screen"])
        if "assignment" in meta:
            self.assignment = Assignment.from_dict(meta["assignment"])
            self.isolated = {int(g): v for g, v in meta["isolated"].items()}
            self.expected_state = {int(g): v for g, v in meta["expected_state"].items()}
            self.verified_state = {int(g): v for g, v in meta["verified_state"].items()}
            self._assignment_doc = None
        self.audit_log = AuditLog.from_bytes(
            t["audit_log"].numpy().tobytes(),
            trusted_key=self.key.public_key,
            run=self.run,
        )
        if (
            self.audit_log.size
            and record_round(self.audit_log.entry(-1)) >= checkpoint.round
        ):
            # skipped rounds (no roots) leave gaps; a log past the checkpoint is wrong
            raise ValueError("checkpoint's audit log runs past the checkpoint's round")
        self._state = _RoundState(checkpoint.round)


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (a sample size)."""
    return int(x + 0.5)


def keyring_digest(keys: Mapping[int, VerifyKey]) -> str:
    """Digest of a keyring (``{id: public key}``), as round records bind it."""
    return digest_hex({str(i): k.to_bytes().hex() for i, k in sorted(keys.items())})

"""The galaxy aggregator's round state machine.

``commit`` -> (quorum or deadline) ``committed`` -> (signed head arrives) ``reveal``
-> (quorum or deadline) ``aggregating`` -> ``done``.

The galaxy speaks for itself: its root, abstention and aggregate are statements
signed with its own provisioned key (:mod:`protogalaxy.crypto.statements`), and
everything it checks (client registrations, commitments, reveals, the global
aggregator's head) is checked against provisioned keys and bound to the run.

Errors are typed so that a transport maps them to status codes in one place:
:class:`WrongPhase` (409), :class:`UnknownClient` (404/403), :class:`Rejected`
(400/401/403/413/422 by ``reason``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.codec import decode_update
from protogalaxy.crypto.commitment import NONCE_SIZE, Commitment
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.heads import SignedRoundHead
from protogalaxy.crypto.identity import (
    SigningKey,
    VerifyKey,
    reveal_digest,
    reveal_hasher,
    verify_commitment_signature,
    verify_registration,
    verify_reveal_signature,
)
from protogalaxy.crypto.merkle import InclusionProof, verify_inclusion
from protogalaxy.crypto.receipts import Receipt
from protogalaxy.crypto.statements import (
    Abstention,
    Acknowledgement,
    AggregateStatement,
    Signed,
    SignedDocument,
    aggregate_digest,
    canonical_json,
    sign_document,
    sign_inline,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf, GalaxyTree
from protogalaxy.defense.integrity import IntegrityError, check_reveal
from protogalaxy.defense.pipeline import GalaxyDefense, GalaxyDefenseReport
from protogalaxy.defense.reputation import ClientRecord
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.sampling import Sampling
from protogalaxy.protocol.stores import GalaxyStore, Phase, PhaseClosed, RevealStage
from protogalaxy.protocol.transcript import VERSION as TRANSCRIPT_VERSION
from protogalaxy.protocol.transcript import (
    defense_digest,
    digest_hex,
    finite_metrics,
    reputation_state,
    tensor_digest,
)
from protogalaxy.spec import UpdateSpec

__all__ = [
    "ClientRoster",
    "GalaxyAggregator",
    "ProtocolError",
    "Rejected",
    "UnknownClient",
    "WrongPhase",
]

_log = logging.getLogger("protogalaxy.galaxy")


class ProtocolError(Exception):
    """Base of the galaxy protocol's errors."""


class WrongPhase(ProtocolError):
    """The request is for another round or phase than the current one."""


class UnknownClient(ProtocolError):
    """The client is not registered, or has no commitment this round."""


class Rejected(ProtocolError):
    """A layer-1 rejection; ``reason`` is an :data:`IntegrityError` reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ClientRoster:
    """The clients a galaxy admits: ids ``0 .. num_clients - 1`` that ``galaxy_of``
    places in this galaxy, each with the public key the operator provisioned for it
    (an allow-list; ``keys`` may hold other galaxies' clients too)."""

    galaxy: int
    num_clients: int
    galaxy_of: Callable[[int], int]
    keys: Mapping[int, VerifyKey]

    def key_for(self, client: object) -> VerifyKey:
        """``client``'s provisioned key; :class:`Rejected` naming why it cannot take
        part here (not an id in range, another galaxy's, not provisioned)."""
        if not isinstance(client, int) or isinstance(client, bool):
            raise Rejected(
                "bad_client_id", f"client id must be an integer, got {client!r}"
            )
        if not 0 <= client < self.num_clients:
            raise Rejected(
                "bad_client_id",
                f"client id {client} is out of range [0, {self.num_clients})",
            )
        home = self.galaxy_of(client)
        if home != self.galaxy:
            raise Rejected(
                "wrong_galaxy",
                f"client {client} belongs to galaxy {home}, not {self.galaxy}",
            )
        key = self.keys.get(client)
        if key is None:
            raise Rejected(
                "not_enrolled", f"client {client} has no provisioned credential"
            )
        return key


@dataclass
class RoundInputs:
    """What a galaxy closes a round with: the accepted reveals (bodies, and the
    client's nonce and signature for each), the layer-1 rejections (reason and the
    client's signed reveal), the withheld leaves and the commitment signatures."""

    clients: list[int]
    bodies: dict[int, bytes]
    proofs: dict[int, bytes]  # nonce (32 B) || reveal signature (64 B)
    rejections: dict[int, dict[str, str]]
    withheld: list[int]
    signatures: dict[int, bytes]

    def revealed(self, client: int, committed: bytes) -> dict[str, str] | None:
        """``client``'s signed reveal (nonce, reveal digest, signature), if any;
        ``committed`` is its commitment's digest (an accepted reveal's digest)."""
        if client in self.proofs:
            proof = self.proofs[client]
            return {
                "nonce": proof[:NONCE_SIZE].hex(),
                "reveal_digest": committed.hex(),
                "reveal_signature": proof[NONCE_SIZE:].hex(),
            }
        rec = self.rejections.get(client)
        if rec is not None and "nonce" in rec:
            return {
                "nonce": rec["nonce"],
                "reveal_digest": rec["digest"],
                "reveal_signature": rec["signature"],
            }
        return None


@dataclass
class GalaxyRoundResult:
    round: int
    galaxy: int
    root: bytes
    aggregate: torch.Tensor | None
    weight: int
    report: GalaxyDefenseReport
    #: the signed statement the aggregate travels with (None: no aggregate)
    statement: Signed[AggregateStatement] | None = None
    #: members of the tree that committed and never revealed
    withheld: tuple[int, ...] = ()
    #: the round's signed transcript
    transcript: SignedDocument | None = None
    #: the evidence records of the round, each signed by the galaxy
    evidence: list[dict[str, Any]] = field(default_factory=list)


class GalaxyAggregator:
    """One galaxy's protocol logic, over a :class:`GalaxyStore`.

    ``key`` is the galaxy's own signing key, ``global_key`` the pinned key of the
    global aggregator, ``roster`` the clients it admits, ``run`` the run every
    signature it makes or checks belongs to.
    """

    def __init__(
        self,
        galaxy: int,
        *,
        store: GalaxyStore,
        spec: UpdateSpec,
        defense: GalaxyDefense,
        key: SigningKey,
        global_key: VerifyKey,
        roster: ClientRoster,
        run: str,
        max_update_bytes: int = 64 << 20,
        quorum: float = 1.0,
        idle_rounds: int = 2,
        sampling: Sampling | None = None,
    ) -> None:
        if not 0 < quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {quorum}")
        if idle_rounds < 1:
            raise ValueError(f"idle_rounds must be >= 1, got {idle_rounds}")
        if roster.galaxy != galaxy:
            raise ValueError(f"roster is for galaxy {roster.galaxy}, not {galaxy}")
        self.galaxy = galaxy
        self.store = store
        self.spec = spec
        self.defense = defense
        self.key = key
        self.global_key = global_key
        self.roster = roster
        self.run = run
        self.max_update_bytes = max_update_bytes
        self.quorum = quorum
        self.idle_rounds = idle_rounds
        #: who takes part in each round (everyone by default)
        self.sampling = sampling or Sampling()
        self._sample_cache: tuple[int, frozenset[int]] = (-1, frozenset())
        self._tree_cache: GalaxyTree | None = None
        self._reputation_version: int | None = None
        # The tracker is read by request handlers (threads) while a close runs:
        # a reload never lands in the middle of a close.
        self._reputation_lock = threading.RLock()
        self._sync_reputation()

    def __getstate__(self) -> dict[str, Any]:
        # a simulation's saved state (``simulate --resume``): the lock is made anew
        return {k: v for k, v in vars(self).items() if k != "_reputation_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._reputation_lock = threading.RLock()

    def _sync_reputation(self, *, force: bool = False) -> None:
        """Take the store's reputation state if it changed since this aggregator
        last read or wrote it: the store is the one source of truth, and another
        replica (or this galaxy before a restart) may have written it."""
        with self._reputation_lock:
            version = self.store.reputation_version()
            if not force and version == self._reputation_version:
                return
            saved = self.store.load_reputation()
            if saved is None:  # nothing stored yet: every client at its start
                saved = {"galaxy": self.galaxy, "clients": {}, "events": []}
            self.defense.tracker.load_state_dict(saved)
            self._reputation_version = version

    # -- state -------------------------------------------------------------------

    @property
    def state(self) -> tuple[int, str] | None:
        return self.store.get_state()

    def _require(self, round: int, phase: str) -> None:
        state = self.store.get_state()
        if state != (round, phase):
            raise WrongPhase(
                f"galaxy {self.galaxy} is at {state}, not round {round} {phase}"
            )

    def open_round(self, round: int) -> None:
        """Start ``round`` (idempotent once it is open)."""
        state = self.store.get_state()
        if state is not None and state[0] >= round:
            if state[0] == round:
                return
            raise WrongPhase(f"galaxy {self.galaxy} is already at round {state[0]}")
        if state is not None and state[1] != Phase.DONE:
            raise WrongPhase(f"round {state[0]} is not done ({state[1]})")
        if not self.sampling.everyone:
            # Stored before the round opens: whoever serves it admits these.
            drawn = sorted(self._draw_sample(round))
            self.store.put_blob(round, "sample", json.dumps(drawn).encode())
        if not self.store.compare_and_set_state(state, (round, Phase.COMMIT)):
            raise WrongPhase("another aggregator moved the round on")
        self._sync_reputation()

    def set_server_update(
        self, round: int, update: torch.Tensor, statement: SignedDocument
    ) -> None:
        """The global aggregator's update on its root dataset for ``round``, for a
        rule that needs one (FLTrust), with the global aggregator's signed
        statement of its digest: refused unless the statement is the global
        aggregator's, for this run and round, over this update. Both are stored
        with the round (a replica that resumes the aggregation uses the same
        update), and the transcript carries the statement."""
        flat = update.detach().reshape(-1).to(torch.float32).contiguous().cpu()
        if flat.numel() != self.spec.numel:
            raise ValueError(
                f"the server update has {flat.numel()} values, the model "
                f"{self.spec.numel}"
            )
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("the server update has non-finite values")
        if statement.kind != "server-update":
            raise ValueError(f"a {statement.kind} is not a server-update statement")
        statement.verify(self.global_key, run=self.run)
        want = {"run": self.run, "round": round, "server_update": tensor_digest(flat)}
        if statement.body != want:
            raise ValueError("the signed statement is not of this update and round")
        self.store.put_blob(round, "server_update", flat.numpy().tobytes())
        self.store.put_blob(
            round, "server_update_statement", canonical_json(statement.to_dict())
        )

    def server_update(self, round: int) -> torch.Tensor | None:
        """The server update stored for ``round`` (None: none was given)."""
        blob = self.store.get_blob(round, "server_update")
        if blob is None:
            return None
        return torch.frombuffer(bytearray(blob), dtype=torch.float32)

    def _server_update_statement(self, round: int) -> dict[str, Any] | None:
        blob = self.store.get_blob(round, "server_update_statement")
        return None if blob is None else dict(json.loads(blob))

    def apply_assignment(self, document: SignedDocument) -> None:
        """Take the global aggregator's signed placement of the clients (after it
        isolated a galaxy): admit the clients now placed here, starting each from
        the reputation record the global aggregator hands over for it."""
        try:
            document.verify(self.global_key, run=self.run)
        except SignatureError as exc:
            raise Rejected("bad_signature", f"assignment: {exc}") from None
        body = document.body
        if document.kind != "assignment" or body.get("run") != self.run:
            raise Rejected("malformed", "not an assignment of this run")
        assignment = Assignment.from_dict(body["assignment"])
        self.roster = dataclasses.replace(self.roster, galaxy_of=assignment.galaxy_of)
        self._sync_reputation()
        tracker = self.defense.tracker
        changed = False
        for c, record in body.get("adopted", {}).items():
            client = int(c)
            if assignment.galaxy_of(client) == self.galaxy and (
                client not in tracker.clients
            ):
                tracker.clients[client] = ClientRecord(**record)
                changed = True
        if changed:
            self.store.save_reputation(tracker.state_dict())
            self._sync_reputation()

    # -- clients ---------------------------------------------------------------

    def register(self, client: int, public_key: bytes, signature: bytes) -> None:
        """Admit ``client`` with ``public_key``, which must be the key provisioned
        for it, proven by ``signature`` (its registration, signed in this run).

        Idempotent: a restarted client registers again with the same key.
        """
        key = self.roster.key_for(client)
        if bytes(public_key) != key.to_bytes():
            raise Rejected(
                "bad_signature",
                f"client {client}: that key is not the credential provisioned for it",
            )
        try:
            verify_registration(
                key, signature, client_id=client, galaxy_id=self.galaxy, run=self.run
            )
        except SignatureError as exc:
            raise Rejected("bad_signature", f"client {client}: {exc}") from None
        if not self.store.register_client(client, key.to_bytes()):
            raise Rejected(
                "duplicate", f"client {client} is registered with another key"
            )

    def sample(self, round: int) -> frozenset[int] | None:
        """The clients of this galaxy that take part in ``round`` (None: every
        one): the run's seeded draw over the clients placed here, as the
        aggregator that opened the round drew it and stored it with the round.
        Every replica (and a restarted process whose placement is not yet
        current) then admits the same clients."""
        if self.sampling.everyone:
            return None
        if self._sample_cache[0] == round:
            return self._sample_cache[1]
        stored = self.store.get_blob(round, "sample")
        if stored is None:  # a round not opened with a sample: draw it here
            return self._draw_sample(round)
        drawn = frozenset(int(c) for c in json.loads(stored))
        self._sample_cache = (round, drawn)
        return drawn

    def _members(self) -> list[int]:
        """The clients placed in this galaxy now."""
        return [
            c
            for c in range(self.roster.num_clients)
            if self.roster.galaxy_of(c) == self.galaxy
        ]

    def _draw_sample(self, round: int) -> frozenset[int]:
        return self.sampling.clients(self._members(), round, self.galaxy)

    def active_clients(self, round: int | None = None) -> int:
        """The commit quorum's base: registered clients that are not banned and did
        not miss the last ``idle_rounds`` rounds in a row they were sampled in (of
        ``round``'s sample, when clients are sampled). A client that registers and
        then stays silent would otherwise hold every round to its deadline; it
        counts again from the round it commits."""
        missed = self._missed()
        self._sync_reputation()
        sample = None if round is None else self.sample(round)
        return sum(
            1
            for c in self.store.clients()
            if not self.defense.banned(c)
            and missed.get(c, 0) < self.idle_rounds
            and (sample is None or c in sample)
        )

    def _missed(self) -> dict[int, int]:
        """Rounds in a row each registered client has not committed in."""
        raw = self.store.get_meta("missed")
        return {} if raw is None else {int(c): n for c, n in json.loads(raw).items()}

    def submit_commitment(self, commitment: Commitment, signature: bytes) -> None:
        """Accept a signed commitment for the current round (layer 1, first half)."""
        c = commitment
        state = self.store.get_state()
        if state is None or state[1] != Phase.COMMIT or c.round != state[0]:
            raise WrongPhase(
                f"commitment for round {c.round}; galaxy {self.galaxy} is at {state}"
            )
        if c.galaxy_id != self.galaxy:
            raise Rejected("wrong_round", f"commitment is for galaxy {c.galaxy_id}")
        key = self.store.client_key(c.client_id)
        if key is None:
            raise UnknownClient(f"client {c.client_id} is not registered")
        sample = self.sample(c.round)
        if sample is not None and c.client_id not in sample:
            raise Rejected(
                "not_sampled",
                f"client {c.client_id} is not in round {c.round}'s sample of "
                f"galaxy {self.galaxy}",
            )
        self._sync_reputation()
        if self.defense.banned(c.client_id):
            raise Rejected("bad_signature", f"client {c.client_id} is banned")
        try:
            verify_commitment_signature(
                VerifyKey.from_bytes(key), c, signature, run=self.run
            )
        except SignatureError as exc:
            raise Rejected("bad_signature", str(exc)) from None
        try:
            added = self.store.add_commitment(
                c.round, c.client_id, c.to_bytes(), bytes(signature)
            )
        except PhaseClosed:
            # The close claimed the phase first: this commitment is not stored, so
            # it is in no tree, and the client knows it is out of this round.
            raise WrongPhase(
                f"round {c.round}: the commit phase closed meanwhile"
            ) from None
        if not added:
            existing = self.store.commitments(c.round).get(c.client_id)
            if existing is None or existing[0] != c.to_bytes():
                raise Rejected("duplicate", f"client {c.client_id} already committed")

    def commit_quorum_reached(self, round: int) -> bool:
        n = self.store.commitment_count(round)
        if n == 0:
            # A sample of banned clients only will never commit: close now (and
            # abstain) instead of waiting out the deadline.
            sample = self.sample(round)
            self._sync_reputation()
            return bool(sample) and all(self.defense.banned(c) for c in sample or ())
        if round == 0 and not self._all_registered(round):
            # The run's start: client pods come up at different times, and a pod
            # that registers a moment late must not lose the first rounds (its
            # clients would trail the others' reputations all run). Round 0
            # waits for every client placed here, or for its deadline.
            return False
        return n >= self.quorum * max(1, self.active_clients(round))

    def _all_registered(self, round: int) -> bool:
        sample = self.sample(round)
        expected = self._members() if sample is None else sample
        return set(expected) <= set(self.store.clients())

    def close_commit(
        self, round: int, *, force: bool = False
    ) -> Signed[GalaxyLeaf] | None:
        """Close the commit phase at quorum (or ``force``: the deadline); build the
        galaxy tree and return the signed leaf to send to the global aggregator
        (None: no commitments, send :meth:`abstention` instead).

        The close is claimed first (``commit`` -> ``closing``, compare-and-set), then
        the members are snapshotted into the store, and every later tree of the round
        (leaf, receipts, aggregation) is built from the snapshot alone, so they always
        agree. The store writes a commitment only while the phase is open, atomically
        with that check, so every stored commitment is in the snapshot and one that
        loses the race to the claim is refused (``WrongPhase``) and stored nowhere.
        A close interrupted after the claim is finished by the next call.
        """
        state = self.store.get_state()
        if state in ((round, Phase.COMMITTED), (round, Phase.REVEAL)):
            return self.signed_root(round)
        if state != (round, Phase.CLOSING):
            self._require(round, Phase.COMMIT)
            if not force and not self.commit_quorum_reached(round):
                raise WrongPhase(f"round {round}: commit quorum not reached")
            if not self.store.compare_and_set_state(
                (round, Phase.COMMIT), (round, Phase.CLOSING)
            ):
                raise WrongPhase("another aggregator is closing the commit phase")
        if self.store.get_blob(round, "members") is None:
            members = sorted(self.store.commitments(round))
            missed = self._missed()
            took_part = set(members)
            sample = self.sample(round)
            # A round a client was not sampled in is not one it missed.
            self.store.put_meta(
                "missed",
                json.dumps(
                    {
                        c: 0
                        if c in took_part
                        else missed.get(c, 0) + (sample is None or c in sample)
                        for c in self.store.clients()
                    }
                ).encode(),
            )
            self.store.put_blob(round, "members", json.dumps(members).encode())
        tree = self._tree(round)
        if tree is None:
            self.store.compare_and_set_state(
                (round, Phase.CLOSING), (round, Phase.DONE)
            )
            return None
        leaf = tree.leaf()
        self.store.put_blob(round, "leaf", leaf.to_bytes())
        if not self.store.compare_and_set_state(
            (round, Phase.CLOSING), (round, Phase.COMMITTED)
        ):
            raise WrongPhase("another aggregator finished closing the commit phase")
        return sign_statement(self.key, leaf, run=self.run)

    def signed_root(self, round: int) -> Signed[GalaxyLeaf] | None:
        """The round's leaf, signed (None before the close or without commitments).

        Ed25519 signatures are deterministic, so signing again gives the same bytes
        a restarted galaxy sent before."""
        blob = self.store.get_blob(round, "leaf")
        if blob is None:
            return None
        return sign_statement(self.key, GalaxyLeaf.from_bytes(blob), run=self.run)

    def abstention(self, round: int) -> Signed[Abstention]:
        """This galaxy's signed word that it has no commitments in ``round``."""
        return sign_statement(self.key, Abstention(round, self.galaxy), run=self.run)

    def signed_aggregate(
        self, round: int
    ) -> tuple[Signed[AggregateStatement], torch.Tensor] | None:
        """The round's aggregate with its signed statement (None: none was made)."""
        blob = self.store.get_blob(round, "aggregate")
        leaf_blob = self.store.get_blob(round, "leaf")
        weight = self.store.get_blob(round, "weight")
        transcript = self.store.get_blob(round, "transcript")
        if blob is None or leaf_blob is None or weight is None or transcript is None:
            return None
        leaf = GalaxyLeaf.from_bytes(leaf_blob)
        digest = SignedDocument.from_bytes(transcript).digest()
        signed = self._sign_aggregate(leaf, int(weight), blob, digest)
        return signed, torch.frombuffer(bytearray(blob), dtype=torch.float32)

    def _sign_aggregate(
        self, leaf: GalaxyLeaf, weight: int, values: bytes, transcript: bytes
    ) -> Signed[AggregateStatement]:
        """The aggregate statement of ``values`` (float32 bytes), bound to ``leaf``
        and to the digest of the round's signed transcript."""
        statement = AggregateStatement(
            leaf.round,
            self.galaxy,
            leaf.tree_size,
            leaf.root,
            weight,
            aggregate_digest(values),
            transcript,
        )
        return sign_statement(self.key, statement, run=self.run)

    def accept_head(
        self, round: int, head: SignedRoundHead, proof: InclusionProof
    ) -> None:
        """Take the global aggregator's signed head and this galaxy's proof in it."""
        state = self.store.get_state()
        if state == (round, Phase.REVEAL):
            return
        self._require(round, Phase.COMMITTED)
        head.verify(self.global_key, run=self.run)
        leaf_blob = self.store.get_blob(round, "leaf")
        assert leaf_blob is not None
        if head.head.round != round:
            raise WrongPhase(f"head is for round {head.head.round}")
        verify_inclusion(
            leaf_blob, proof, head.head.root, tree_size=head.head.tree_size
        )
        self.store.put_blob(round, "head", head.to_bytes())
        self.store.put_blob(round, "galaxy_proof", proof.to_bytes())
        self.store.compare_and_set_state(
            (round, Phase.COMMITTED), (round, Phase.REVEAL)
        )

    def _tree(self, round: int) -> GalaxyTree | None:
        """The round's galaxy tree over the snapshotted members (None: no members).

        Built once per round and cached: the snapshot never changes.
        """
        if self._tree_cache is not None and self._tree_cache.round == round:
            return self._tree_cache
        blob = self.store.get_blob(round, "members")
        if blob is None:
            raise WrongPhase(f"round {round}: the commit phase has not closed")
        members: list[int] = json.loads(blob)
        if not members:
            return None
        records = self.store.commitments(round)
        tree = GalaxyTree(
            (Commitment.from_bytes(records[c][0]) for c in members),
            galaxy_id=self.galaxy,
            round=round,
        )
        self._tree_cache = tree
        return tree

    def receipt(self, round: int, client: int) -> Receipt:
        """The two-level receipt of ``client``'s commitment (after the head arrived)."""
        state = self.store.get_state()
        if (
            state is None
            or state[0] != round
            or state[1] not in (Phase.REVEAL, Phase.DONE)
        ):
            raise WrongPhase(f"no signed head for round {round} yet (state {state})")
        tree = self._tree(round)
        if tree is None or client not in tree.client_ids:
            raise UnknownClient(f"client {client} has no commitment in round {round}")
        head_blob = self.store.get_blob(round, "head")
        proof_blob = self.store.get_blob(round, "galaxy_proof")
        assert head_blob is not None and proof_blob is not None
        return Receipt(
            tree.commitment_of(client),
            tree.proof_for(client),
            tree.leaf(),
            InclusionProof.from_bytes(proof_blob),
            SignedRoundHead.from_bytes(head_blob),
        )

    def reveal_hasher(self, round: int, client: int, nonce: bytes) -> Any | None:
        """A hash state for :meth:`submit_reveal`'s ``digest``, to be fed the body as
        it arrives; None when ``client`` is not in the round's snapshot or ``nonce``
        is malformed (:meth:`submit_reveal` then says why)."""
        try:
            tree = self._tree(round)
        except WrongPhase:  # the commit phase has not closed
            return None
        if tree is None or client not in tree.client_ids:
            return None
        try:
            return reveal_hasher(tree.commitment_of(client), nonce)
        except ValueError:
            return None

    def submit_reveal(
        self,
        round: int,
        client: int,
        body: bytes | memoryview,
        nonce: bytes,
        signature: bytes,
        *,
        digest: bytes | None = None,
        staged: RevealStage | None = None,
    ) -> Signed[Acknowledgement]:
        """Accept a signed reveal after layer 1; return the galaxy's signed
        acknowledgement of it (the same one again for an identical resend). With it
        the client can prove its update was taken, whatever the galaxy says later.

        ``digest`` is the body's :func:`~protogalaxy.crypto.identity.reveal_digest`
        when the caller hashed the body as it arrived (:meth:`reveal_hasher`).
        ``staged`` is the body as the caller also wrote it to the store on arrival
        (:meth:`~protogalaxy.protocol.stores.GalaxyStore.stage_reveal`): committed
        if the reveal is accepted; the caller discards it otherwise.

        Order matters: a resent or second reveal and a bad signature are refused
        before layer 1 runs, so only an authenticated reveal can be recorded as a
        layer-1 rejection against the client (and lower its reputation).
        """
        self._require(round, Phase.REVEAL)
        tree = self._tree(round)
        if tree is None or client not in tree.client_ids:
            raise UnknownClient(f"client {client} has no commitment in round {round}")
        commitment = tree.commitment_of(client)  # the snapshot's, cached
        existing = self.store.get_reveal(round, client)
        if existing is not None:
            if existing[0] == bytes(body) and existing[1][:NONCE_SIZE] == bytes(nonce):
                return self._acknowledge(commitment)
            raise Rejected("duplicate", f"client {client} already revealed")
        if self.store.is_rejected(round, client):
            raise Rejected(
                "duplicate", f"client {client}'s reveal was already rejected"
            )
        key = self.store.client_key(client)
        assert key is not None  # a commitment is only accepted from a registered key
        if len(body) > self.max_update_bytes:
            raise Rejected(
                "too_large",
                f"{len(body)} bytes exceeds the limit of {self.max_update_bytes}",
            )
        # One pass over the body: the same digest authenticates the reveal and is
        # matched against the commitment.
        try:
            if digest is None:
                digest = reveal_digest(commitment, body, nonce)
        except ValueError as exc:  # a nonce of the wrong size
            raise Rejected("malformed", str(exc)) from None
        try:
            verify_reveal_signature(
                VerifyKey.from_bytes(key),
                commitment,
                nonce,
                signature,
                digest=digest,
                run=self.run,
            )
        except SignatureError as exc:
            raise Rejected("bad_signature", str(exc)) from None
        try:
            check_reveal(
                commitment,
                body,
                digest=digest,
                spec=self.spec,
                max_bytes=self.max_update_bytes,
            )
        except IntegrityError as exc:
            # The client's own signed reveal is kept with the reason, and so is the
            # body when it matches the commitment (an honestly committed but
            # malformed update): an auditor can check the rejection.
            record = {
                "reason": exc.reason,
                "nonce": bytes(nonce).hex(),
                "digest": digest.hex(),
                "signature": bytes(signature).hex(),
            }
            try:
                # One fate per client: False when a reveal of it was accepted (or
                # rejected) meanwhile; this one is refused and recorded nowhere.
                recorded = self.store.add_rejection(round, client, json.dumps(record))
            except PhaseClosed:
                raise self._closed_meanwhile(round) from None
            if recorded and digest == commitment.digest:
                self.store.put_blob(round, f"rejected:{client}", bytes(body))
            raise Rejected(exc.reason, exc.detail) from None
        try:
            added = self.store.add_reveal(
                round, client, body, bytes(nonce) + bytes(signature), staged=staged
            )
        except PhaseClosed:
            # The close claimed the phase first: not stored, not aggregated.
            raise self._closed_meanwhile(round) from None
        if not added:
            raise Rejected(
                "duplicate", f"client {client} already revealed or was rejected"
            )
        return self._acknowledge(commitment)

    def _acknowledge(self, commitment: Commitment) -> Signed[Acknowledgement]:
        ack = Acknowledgement(
            commitment.round,
            self.galaxy,
            commitment.client_id,
            commitment.to_bytes(),
            commitment.digest,
        )
        return sign_statement(self.key, ack, run=self.run)

    def rejection_records(self, round: int) -> dict[int, dict[str, str]]:
        """Layer-1 rejections of ``round``: reason and the client's signed reveal."""
        out = {}
        for c, raw in self.store.rejections(round).items():
            try:
                record = json.loads(raw)
            except ValueError:  # a bare reason (no signed reveal kept)
                record = {"reason": raw}
            out[c] = record if isinstance(record, dict) else {"reason": str(raw)}
        return out

    @staticmethod
    def _closed_meanwhile(round: int) -> WrongPhase:
        return WrongPhase(f"round {round}: the reveal phase closed meanwhile")

    def reveal_quorum_reached(self, round: int) -> bool:
        tree = self._tree(round)
        committed = 0 if tree is None else tree.size
        done = self.store.reveal_count(round) + self.store.rejection_count(round)
        return committed > 0 and done >= self.quorum * committed

    def close_reveal(
        self,
        round: int,
        *,
        reference_direction: torch.Tensor | None = None,
        force: bool = False,
    ) -> GalaxyRoundResult:
        """Close the reveal phase; run layers 2-4; store reputations and evidence;
        sign the round's transcript and the aggregate statement bound to it.

        A member of the tree that neither revealed nor was rejected withheld its
        update: layer 4 scores it zero for the round, with its signed commitment
        as evidence (``reveal_withheld``)."""
        self._require(round, Phase.REVEAL)
        if not force and not self.reveal_quorum_reached(round):
            raise WrongPhase(f"round {round}: reveal quorum not reached")
        if not self.store.compare_and_set_state(
            (round, Phase.REVEAL), (round, Phase.AGGREGATING)
        ):
            raise WrongPhase("another aggregator is aggregating this round")
        self.store.put_blob(round, "aggregating_at", repr(time.time()).encode())
        return self._aggregate(round, reference_direction)

    def aggregating_since(self, round: int) -> float | None:
        """When the close of ``round`` claimed the phase (None: not recorded, e.g.
        the process died between the claim and the note)."""
        blob = self.store.get_blob(round, "aggregating_at")
        try:
            return None if blob is None else float(blob.decode())
        except ValueError:
            return None

    def resume_aggregation(
        self, round: int, *, reference_direction: torch.Tensor | None = None
    ) -> GalaxyRoundResult:
        """Aggregate a round left ``aggregating`` (its closer was killed, or is a
        replica that stopped), from the stored reveals and rejections and the
        stored reputation state. Nothing of a close is stored before its one
        atomic :meth:`GalaxyStore.finish_round`, and aggregation is exact, so this
        gives the very bytes the killed close would have given, once: should the
        other closer still be alive, whichever finishes second writes nothing.

        The caller decides when the claim is stale (see :meth:`aggregating_since`).
        """
        self._require(round, Phase.AGGREGATING)
        _log.warning("round %d: aggregating again from the stored reveals", round)
        return self._aggregate(round, reference_direction)

    def _aggregate(
        self, round: int, reference_direction: torch.Tensor | None
    ) -> GalaxyRoundResult:
        with self._reputation_lock:
            try:
                return self._aggregate_locked(round, reference_direction)
            except BaseException:
                # The tracker may hold a close that was never stored: it is not
                # the store's state any more; the next use reloads it.
                self._reputation_version = None
                raise

    def _aggregate_locked(
        self, round: int, reference_direction: torch.Tensor | None
    ) -> GalaxyRoundResult:
        tree = self._tree(round)
        assert tree is not None  # an empty snapshot ends the round at close_commit
        # The state this round starts from is the store's, not what this process
        # holds: a stale replica must not write old reputations back.
        self._sync_reputation(force=True)
        inputs = self._round_inputs(round, tree)
        before = reputation_state(self.defense.tracker)
        report = self._defend(round, tree, inputs, reference_direction)
        after = reputation_state(self.defense.tracker)
        transcript = sign_document(
            self.key,
            "transcript",
            self._transcript_body(
                round, tree, inputs, report, before, after, reference_direction
            ),
            run=self.run,
        )
        blobs = {
            "transcript": transcript.to_bytes(),
            "reputation_before": canonical_json(before),
            "reputation_after": canonical_json(after),
        }
        evidence = []
        for event in report.events:
            body = {
                "galaxy": self.galaxy,
                **event.to_dict(),
                "transcript": transcript.digest().hex(),
            }
            evidence.append(sign_inline(self.key, "evidence", body, run=self.run))
        statement = None
        weight = report.weight
        if report.aggregate is not None:
            values = report.aggregate.to(torch.float32).contiguous().numpy().tobytes()
            weight, values = self._published_aggregate(round, weight, values)
            blobs["aggregate"] = values
            blobs["weight"] = str(weight).encode()
            statement = self._sign_aggregate(
                tree.leaf(), weight, values, transcript.digest()
            )
        finished = self.store.finish_round(
            round,
            blobs=blobs,
            reputation=self.defense.tracker.state_dict(),
            evidence=evidence,
        )
        self._sync_reputation(force=True)
        self.store.drop_stages(round)  # what killed uploads left: no use now
        if not finished:
            raise WrongPhase(f"round {round}: another aggregator finished it")
        for record in evidence:
            _log.warning("%s", record["event"], extra={"event_record": record})
        return GalaxyRoundResult(
            round,
            self.galaxy,
            tree.root,
            report.aggregate,
            report.weight,
            report,
            statement,
            tuple(inputs.withheld),
            transcript,
            evidence,
        )

    # -- the steps of a close (a compromised galaxy in a scenario overrides them) --

    def _round_inputs(self, round: int, tree: GalaxyTree) -> RoundInputs:
        """The round's reveals, rejections and withheld leaves, as stored."""
        reveals = self.store.reveals(round)
        rejections = self.rejection_records(round)
        both = set(reveals) & set(rejections)
        if both:  # the store broke one-fate-per-client: the reveal was acknowledged
            _log.error("round %d: clients %s both revealed and rejected", round, both)
            rejections = {c: r for c, r in rejections.items() if c not in both}
        clients = sorted(reveals)
        return RoundInputs(
            clients=clients,
            bodies={c: reveals[c][0] for c in clients},
            proofs={c: reveals[c][1] for c in clients},
            rejections=rejections,
            withheld=[
                c for c in tree.client_ids if c not in reveals and c not in rejections
            ],
            signatures={c: rec[1] for c, rec in self.store.commitments(round).items()},
        )

    def _defend(
        self,
        round: int,
        tree: GalaxyTree,
        inputs: RoundInputs,
        reference_direction: torch.Tensor | None,
    ) -> GalaxyDefenseReport:
        """Layers 2-4 over the decoded reveals."""
        # Views of the stored bodies, copied once into the row by flatten.
        rows = [
            self.spec.flatten(
                decode_update(
                    inputs.bodies[c], max_bytes=self.max_update_bytes, copy=False
                )
            )
            for c in inputs.clients
        ]
        updates = torch.stack(rows) if rows else torch.zeros(0, self.spec.numel)

        def evidence_for(client: int) -> dict[str, Any]:
            out: dict[str, Any] = {"round": round, "galaxy_root": tree.root.hex()}
            if client not in tree.client_ids:
                return out
            commitment = tree.commitment_of(client)
            out["leaf"] = commitment.to_bytes().hex()
            out["commitment_signature"] = inputs.signatures[client].hex()
            out["inclusion_proof"] = tree.proof_for(client).to_dict()
            out["update_digest"] = commitment.digest.hex()
            revealed = inputs.revealed(client, commitment.digest)
            if revealed is not None:
                out.update(revealed)
            return out

        return self.defense.run(
            round=round,
            clients=inputs.clients,
            updates=updates,
            rejected={c: r["reason"] for c, r in inputs.rejections.items()},
            withheld=inputs.withheld,
            reference_direction=reference_direction,
            evidence_for=evidence_for,
            server_update=self.server_update(round),
        )

    def _transcript_body(
        self,
        round: int,
        tree: GalaxyTree,
        inputs: RoundInputs,
        report: GalaxyDefenseReport,
        before: dict[str, Any],
        after: dict[str, Any],
        reference_direction: torch.Tensor | None,
    ) -> dict[str, Any]:
        """The transcript (see :mod:`protogalaxy.protocol.transcript`)."""
        entries = []
        for c in tree.client_ids:
            entry: dict[str, Any] = {
                "client": c,
                "commitment": tree.commitment_of(c).to_bytes().hex(),
                "commitment_signature": inputs.signatures[c].hex(),
            }
            o = report.outcomes.get(c)
            if c in inputs.withheld or o is None:
                entry["fate"] = "withheld"
            elif c in inputs.rejections:
                entry["fate"] = "rejected"
                entry["reason"] = inputs.rejections[c]["reason"]
            else:
                entry["fate"] = "aggregated" if o.selected else "excluded"
                entry.update(
                    flags=list(o.flags),
                    active=o.active,
                    selected=o.selected,
                    weight=o.weight,
                    metrics=finite_metrics(o.metrics),
                )
            entry.update(inputs.revealed(c, tree.commitment_of(c).digest) or {})
            entries.append(entry)
        values = report.aggregate
        return {
            "version": TRANSCRIPT_VERSION,
            "run": self.run,
            "round": round,
            "galaxy": self.galaxy,
            "root": tree.root.hex(),
            "tree_size": tree.size,
            "defense": defense_digest(self.defense.config),
            "reference": tensor_digest(reference_direction),
            **(
                {}
                if (server := self.server_update(round)) is None
                else {
                    "server_update": tensor_digest(server),
                    "server_update_statement": self._server_update_statement(round),
                }
            ),
            "reputation_before": digest_hex(before),
            "reputation_after": digest_hex(after),
            "rule": report.rule,
            "f": report.f,
            **(
                {}
                if report.null_weight is None
                else {"null_weight": report.null_weight}
            ),
            "fallback": report.fallback,
            "aggregate": tensor_digest(values),
            "weight": report.weight if values is not None else 0,
            "clients": entries,
        }

    def _published_aggregate(
        self, round: int, weight: int, values: bytes
    ) -> tuple[int, bytes]:
        """The weight and aggregate (float32 bytes) this galaxy publishes for the
        round: what it computed (a compromised galaxy in a scenario lies here)."""
        return weight, values

    # -- what auditors fetch ---------------------------------------------------------

    def transcript(
        self, round: int
    ) -> tuple[SignedDocument, dict[str, Any], dict[str, Any]] | None:
        """The round's signed transcript with the reputation state before and after
        it (None before the round closed, or after its data expired)."""
        blobs = [
            self.store.get_blob(round, k)
            for k in ("transcript", "reputation_before", "reputation_after")
        ]
        if any(b is None for b in blobs):
            return None
        doc, before, after = blobs
        assert doc is not None and before is not None and after is not None
        return (
            SignedDocument.from_bytes(doc, kind="transcript"),
            json.loads(before),
            json.loads(after),
        )

    def audit_update(self, round: int, client: int) -> bytes | None:
        """The body ``client`` revealed in ``round`` (accepted, or rejected while it
        matched its commitment), for an auditor; None if not kept."""
        reveal = self.store.get_reveal(round, client)
        if reveal is not None:
            return reveal[0]
        return self.store.get_blob(round, f"rejected:{client}")

"""The global aggregator's round state machine.

``leaves``: collect galaxy roots -> build the global tree, sign the round head ->
``aggregates``: collect galaxy aggregates, each bound to the root the galaxy sent ->
run layer 5, combine, apply the update with the server optimizer, append the head
to the audit log -> next round (model version r + 1).

Nothing a galaxy says is taken on the caller's word: a root, an abstention or an
aggregate for galaxy ``g`` counts only when galaxy ``g``'s provisioned key signed
it in this run. An aggregate's weight comes from its signed statement (the updates
the galaxy aggregated, at most its committed tree size), its values must be float32
of the model's shape and hash to the signed digest, and a combined update that is
not finite is never applied.

The server step is FedAvgM (Hsu, Qi, Brown 2019): ``v <- beta v + g``,
``w <- w + eta v`` on the combined aggregate ``g``; ``beta = 0`` is plain FedAvg.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.crypto.audit import AuditLog
from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.heads import SignedRoundHead, sign_round_head
from protogalaxy.crypto.identity import SigningKey, VerifyKey
from protogalaxy.crypto.merkle import InclusionProof
from protogalaxy.crypto.statements import (
    Abstention,
    AggregateStatement,
    Signed,
    aggregate_digest,
)
from protogalaxy.crypto.trees import GalaxyLeaf, GlobalTree
from protogalaxy.defense.pipeline import GlobalDefense, GlobalDefenseReport
from protogalaxy.protocol.checkpoint import Checkpoint
from protogalaxy.protocol.galaxy import Rejected, UnknownClient, WrongPhase

__all__ = ["GlobalAggregator", "GlobalRoundResult"]

_log = logging.getLogger("protogalaxy.global")


@dataclass
class GlobalRoundResult:
    round: int
    head: SignedRoundHead
    report: GlobalDefenseReport
    applied: bool
    update_norm: float


@dataclass
class _RoundState:
    round: int
    phase: str = "leaves"
    leaves: dict[int, GalaxyLeaf] = field(default_factory=dict)
    abstained: set[int] = field(default_factory=set)
    tree: GlobalTree | None = None
    head: SignedRoundHead | None = None
    aggregates: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)


class GlobalAggregator:
    """The global round logic. ``key`` signs the round heads; ``galaxy_keys`` are
    the galaxies' provisioned public keys (the galaxies taking part); ``run`` is the
    run every signature belongs to; ``galaxy_sizes`` the number of clients each
    galaxy has (no galaxy's tree, so no weight, can be larger)."""

    def __init__(
        self,
        *,
        key: SigningKey,
        galaxy_keys: Mapping[int, VerifyKey],
        galaxy_sizes: Mapping[int, int],
        run: str,
        params: torch.Tensor,
        defense: GlobalDefense,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        audit_log: AuditLog | None = None,
    ) -> None:
        if not galaxy_keys:
            raise ValueError("at least one galaxy is needed")
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError("need server_lr > 0 and 0 <= server_momentum < 1")
        if set(galaxy_sizes) != set(galaxy_keys):
            raise ValueError("galaxy_sizes must name exactly the galaxies with keys")
        self.key = key
        self.run = run
        self.galaxy_keys = dict(galaxy_keys)
        self.galaxy_sizes = {g: int(n) for g, n in galaxy_sizes.items()}
        self.galaxies = sorted(self.galaxy_keys)
        self.params = params.detach().clone()
        self.defense = defense
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.audit_log = (
            audit_log
            if audit_log is not None
            else AuditLog(trusted_key=key.public_key, run=run)
        )
        self.velocity = torch.zeros_like(self.params)
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

    def _authenticate_as(self, galaxy: int, signed: Signed[Any]) -> None:
        """Raise ``Rejected("bad_signature")`` (401) unless galaxy ``galaxy``'s key
        signed ``signed`` in this run; ``unknown_client`` for a galaxy not taking
        part."""
        key = self.galaxy_keys.get(galaxy)
        if key is None:
            raise Rejected("unknown_client", f"galaxy {galaxy} is not configured")
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
        if leaf.tree_size > self.galaxy_sizes[leaf.galaxy_id]:
            _log.error(
                "galaxy %d claims a tree of %d leaves; it has %d clients",
                leaf.galaxy_id,
                leaf.tree_size,
                self.galaxy_sizes[leaf.galaxy_id],
            )
            raise Rejected(
                "tree_too_large",
                f"galaxy {leaf.galaxy_id} has {self.galaxy_sizes[leaf.galaxy_id]} "
                f"clients; a tree of {leaf.tree_size} leaves cannot be",
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
        self, round: int, *, timestamp_ms: int | None = None
    ) -> SignedRoundHead:
        """Build the global tree and sign the round head."""
        self._require(round, "leaves")
        if not self._state.leaves:
            raise WrongPhase(f"round {round}: no galaxy sent a root")
        tree = GlobalTree(self._state.leaves.values(), round=round)
        ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        head = sign_round_head(self.key, tree.head(ts, run=self.run))
        self._state.tree = tree
        self._state.head = head
        self._state.phase = "aggregates"
        return head

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
        return True

    def finish_round(self, round: int) -> GlobalRoundResult:
        """Layer 5, combine, apply, log; then open the next round."""
        self._require(round, "aggregates")
        head = self._state.head
        assert head is not None
        report = self.defense.run(
            self._state.aggregates,
            reference_direction=self.reference_direction,
            model_norm=float(
                torch.linalg.vector_norm(self.params, dtype=torch.float64)
            ),
        )
        applied = False
        norm = 0.0
        if report.aggregate is not None:
            g = report.aggregate.to(self.params.dtype)
            velocity = self.server_momentum * self.velocity + g
            params = self.params + self.server_lr * velocity
            if all(bool(torch.isfinite(t).all()) for t in (g, velocity, params)):
                self.velocity, self.params = velocity, params
                self.direction_sum += g
                self.direction_count += 1
                norm = float(torch.linalg.vector_norm(g))
                applied = True
            else:  # never publish a model that is not finite
                _log.error("round %d: the step is not finite; not applied", round)
        self.audit_log.append(head)
        self._state = _RoundState(round + 1)
        return GlobalRoundResult(round, head, report, applied, norm)

    def checkpoint(self) -> Checkpoint:
        """Everything needed to resume at :attr:`round`: model, server optimizer,
        reference direction, galaxy reputations and the audit log."""
        log = torch.frombuffer(bytearray(self.audit_log.to_bytes()), dtype=torch.uint8)
        return Checkpoint(
            self._state.round,
            {
                "direction_count": self.direction_count,
                "galaxy_screen": self.defense.screen.state_dict(),
                "galaxies": self.galaxies,
                "run": self.run,
                "signer": self.key.public_key.to_bytes().hex(),
            },
            {
                "params": self.params.clone(),
                "velocity": self.velocity.clone(),
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
        self.direction_sum = t["direction_sum"].clone()
        self.direction_count = int(meta["direction_count"])
        self.defense.screen.load_state_dict(meta["galaxy_screen"])
        self.audit_log = AuditLog.from_bytes(
            t["audit_log"].numpy().tobytes(),
            trusted_key=self.key.public_key,
            run=self.run,
        )
        if (
            self.audit_log.size
            and self.audit_log.entry(-1).head.round >= checkpoint.round
        ):
            # skipped rounds (no roots) leave gaps; a log past the checkpoint is wrong
            raise ValueError("checkpoint's audit log runs past the checkpoint's round")
        self._state = _RoundState(checkpoint.round)

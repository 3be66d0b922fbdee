"""The global aggregator's round state machine.

``leaves``: collect galaxy roots -> build the global tree, sign the round head ->
``aggregates``: collect galaxy aggregates, each bound to the root the galaxy sent ->
run layer 5, combine, apply the update with the server optimizer, append the head
to the audit log -> next round (model version r + 1).

The server step is FedAvgM (Hsu, Qi, Brown 2019): ``v <- beta v + g``,
``w <- w + eta v`` on the combined aggregate ``g``; ``beta = 0`` is plain FedAvg.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field

import torch

from protogalaxy.crypto.audit import AuditLog
from protogalaxy.crypto.heads import SignedRoundHead, sign_round_head
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.merkle import InclusionProof
from protogalaxy.crypto.trees import GalaxyLeaf, GlobalTree
from protogalaxy.defense.pipeline import GlobalDefense, GlobalDefenseReport
from protogalaxy.protocol.checkpoint import Checkpoint
from protogalaxy.protocol.galaxy import Rejected, WrongPhase

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
    tree: GlobalTree | None = None
    head: SignedRoundHead | None = None
    aggregates: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)


class GlobalAggregator:
    def __init__(
        self,
        *,
        key: SigningKey,
        galaxies: list[int],
        params: torch.Tensor,
        defense: GlobalDefense,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        audit_log: AuditLog | None = None,
    ) -> None:
        if not galaxies:
            raise ValueError("at least one galaxy is needed")
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError("need server_lr > 0 and 0 <= server_momentum < 1")
        self.key = key
        self.galaxies = sorted(galaxies)
        self.params = params.detach().clone()
        self.defense = defense
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.audit_log = audit_log if audit_log is not None else AuditLog()
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

    def submit_leaf(self, leaf: GalaxyLeaf) -> None:
        """A galaxy's root and size for this round (an identical resend is a no-op)."""
        self._require(leaf.round, "leaves")
        if leaf.galaxy_id not in self.galaxies:
            raise Rejected(
                "unknown_client", f"galaxy {leaf.galaxy_id} is not configured"
            )
        known = self._state.leaves.get(leaf.galaxy_id)
        if known is not None and known != leaf:
            _log.error("galaxy %d sent a second, different root", leaf.galaxy_id)
            raise Rejected(
                "duplicate", f"galaxy {leaf.galaxy_id} already sent another root"
            )
        self._state.leaves[leaf.galaxy_id] = leaf

    def close_leaves(
        self, round: int, *, timestamp_ms: int | None = None
    ) -> SignedRoundHead:
        """Build the global tree and sign the round head."""
        self._require(round, "leaves")
        if not self._state.leaves:
            raise WrongPhase(f"round {round}: no galaxy sent a root")
        tree = GlobalTree(self._state.leaves.values(), round=round)
        ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        head = sign_round_head(self.key, tree.head(ts))
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
        return self._state.tree.proof_for(galaxy)

    def submit_aggregate(
        self, round: int, galaxy: int, root: bytes, aggregate: torch.Tensor, weight: int
    ) -> bool:
        """Accept a galaxy's aggregate, bound to the root it committed to.

        Returns True when accepted, False for an identical resubmission; a
        conflicting resubmission is rejected and logged as tampering.
        """
        self._require(round, "aggregates")
        leaf = self._state.leaves.get(galaxy)
        if leaf is None:
            raise Rejected(
                "unknown_client", f"galaxy {galaxy} has no root in round {round}"
            )
        if not hmac.compare_digest(leaf.root, bytes(root)):
            raise Rejected(
                "commitment_mismatch",
                f"aggregate of galaxy {galaxy} is bound to another root",
            )
        if aggregate.shape != self.params.shape or not bool(
            torch.isfinite(aggregate).all()
        ):
            raise Rejected(
                "shape",
                f"aggregate of galaxy {galaxy}: wrong shape or non-finite values",
            )
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
            self._state.aggregates, reference_direction=self.reference_direction
        )
        applied = report.aggregate is not None
        norm = 0.0
        if report.aggregate is not None:
            g = report.aggregate.to(self.params.dtype)
            self.velocity = self.server_momentum * self.velocity + g
            self.params += self.server_lr * self.velocity
            self.direction_sum += g
            self.direction_count += 1
            norm = float(torch.linalg.vector_norm(g))
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
            t["audit_log"].numpy().tobytes(), trusted_key=self.key.public_key
        )
        if (
            self.audit_log.size
            and self.audit_log.entry(-1).head.round >= checkpoint.round
        ):
            # skipped rounds (no roots) leave gaps; a log past the checkpoint is wrong
            raise ValueError("checkpoint's audit log runs past the checkpoint's round")
        self._state = _RoundState(checkpoint.round)

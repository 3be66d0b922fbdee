"""Layer 4: client reputation, quarantine and bans, each decision with its evidence.

Every round a client takes part in, its behaviour score is

``B = 0.1 integrity + 0.3 statistics + 0.4 selected + 0.2 history``

where integrity, statistics and selected are 1 when the client passed layer 1, was
not flagged by layer 2, and was selected by layer 3, and history is the fraction of
its rounds so far (this one included) in which it passed all three. A client that
committed and then withheld its reveal scores ``B = 0`` for the round: it held the
round to its deadline and gave nothing. Its reputation
follows the exponentially weighted moving average

``R <- (1 - lambda) R + lambda B``,  ``R_0 = 0.5``, with ``lambda = 0.2`` when
``B < R`` and ``lambda_up = 0.05`` when ``B > R``: it falls fast and recovers
slowly, so an intermittent attacker's clean rounds do not undo its flagged ones.

Below 0.3 a client is quarantined (its updates are still screened but excluded from
aggregation; it is released when R climbs back to 0.3). Below 0.1 it is banned for
good. Each transition is recorded with the evidence handed in by the caller (leaf,
inclusion proof, galaxy root, round, the metrics that fired).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ClientRecord", "ReputationConfig", "ReputationEvent", "ReputationTracker"]

ACTIVE, QUARANTINED, BANNED = "active", "quarantined", "banned"


@dataclass(frozen=True)
class ReputationConfig:
    initial: float = 0.5
    lam: float = 0.2
    #: The rate at which a reputation rises again (``B > R``); None: ``lam``.
    #: Below ``lam``, misbehaviour is remembered: an intermittent attacker's clean
    #: rounds no longer undo its flagged ones.
    lam_up: float | None = 0.05
    w_integrity: float = 0.1
    w_statistics: float = 0.3
    w_selected: float = 0.4
    w_history: float = 0.2
    quarantine_below: float = 0.3
    ban_below: float = 0.1

    def __post_init__(self) -> None:
        weights = (self.w_integrity, self.w_statistics, self.w_selected, self.w_history)
        if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-9:
            raise ValueError(
                f"the behaviour weights must be >= 0 and sum to 1, got {weights}"
            )
        if not 0 < self.lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {self.lam}")
        if self.lam_up is not None and not 0 < self.lam_up <= 1:
            raise ValueError(f"lam_up must be in (0, 1], got {self.lam_up}")
        if not 0 <= self.ban_below <= self.quarantine_below <= 1:
            raise ValueError("need 0 <= ban_below <= quarantine_below <= 1")
        if not 0 <= self.initial <= 1:
            raise ValueError(f"initial must be in [0, 1], got {self.initial}")


@dataclass
class ClientRecord:
    reputation: float
    status: str = ACTIVE
    rounds: int = 0
    clean_rounds: int = 0
    last_round: int = -1


@dataclass(frozen=True)
class ReputationEvent:
    """A status change: client_quarantined, client_released or client_banned."""

    event: str
    client: int
    galaxy: int
    round: int
    reputation: float
    reasons: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


class ReputationTracker:
    """Reputations of one galaxy's clients."""

    def __init__(self, galaxy: int, config: ReputationConfig | None = None) -> None:
        self.galaxy = galaxy
        self.config = config or ReputationConfig()
        self.clients: dict[int, ClientRecord] = {}
        self.events: list[ReputationEvent] = []

    def record(self, client: int) -> ClientRecord:
        if client not in self.clients:
            self.clients[client] = ClientRecord(self.config.initial)
        return self.clients[client]

    def reputation(self, client: int) -> float:
        return self.record(client).reputation

    def status(self, client: int) -> str:
        return self.record(client).status

    def may_aggregate(self, client: int) -> bool:
        return self.status(client) == ACTIVE

    def behaviour_score(
        self, *, integrity: bool, statistics: bool, selected: bool, history: float
    ) -> float:
        c = self.config
        return (
            c.w_integrity * integrity
            + c.w_statistics * statistics
            + c.w_selected * selected
            + c.w_history * history
        )

    def observe(
        self,
        client: int,
        *,
        round: int,
        integrity: bool,
        statistics: bool,
        selected: bool,
        withheld: bool = False,
        reasons: tuple[str, ...] = (),
        evidence: dict[str, Any] | None = None,
    ) -> ReputationEvent | None:
        """Fold one round's behaviour into ``client``'s reputation.

        Idempotent per round: a second observation of the same round is ignored, so
        a retried or duplicated aggregation cannot count a round twice.
        """
        rec = self.record(client)
        if round <= rec.last_round or rec.status == BANNED:
            return None
        clean = integrity and statistics and selected
        rec.rounds += 1
        rec.clean_rounds += int(clean)
        rec.last_round = round
        history = rec.clean_rounds / rec.rounds
        b = 0.0
        if not withheld:
            b = self.behaviour_score(
                integrity=integrity,
                statistics=statistics,
                selected=selected,
                history=history,
            )
        lam = self.config.lam
        if b > rec.reputation and self.config.lam_up is not None:
            lam = self.config.lam_up
        rec.reputation = (1 - lam) * rec.reputation + lam * b
        new = self._status_for(rec)
        if new == rec.status:
            return None
        name = {
            QUARANTINED: "client_quarantined",
            BANNED: "client_banned",
            ACTIVE: "client_released",
        }[new]
        rec.status = new
        event = ReputationEvent(
            name,
            client,
            self.galaxy,
            round,
            rec.reputation,
            reasons,
            dict(evidence or {}),
        )
        self.events.append(event)
        return event

    def _status_for(self, rec: ClientRecord) -> str:
        if rec.reputation < self.config.ban_below:
            return BANNED
        if rec.reputation < self.config.quarantine_below:
            return QUARANTINED
        return ACTIVE

    def state_dict(self) -> dict[str, Any]:
        return {
            "galaxy": self.galaxy,
            "clients": {c: asdict(r) for c, r in self.clients.items()},
            "events": [e.to_dict() for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("galaxy") != self.galaxy:
            raise ValueError(
                f"state is for galaxy {state.get('galaxy')}, not {self.galaxy}"
            )
        self.clients = {int(c): ClientRecord(**r) for c, r in state["clients"].items()}
        self.events = [
            ReputationEvent(**{**e, "reasons": tuple(e["reasons"])})
            for e in copy.deepcopy(state["events"])
        ]

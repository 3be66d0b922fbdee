"""The defense pipeline: layers 1 to 4 in a galaxy, layer 5 at the global aggregator.

Which layers run is configuration: ``{1, 2, 3, 4, 5}`` is ProtoGalaxy-Full,
``{1, 3}`` ProtoGalaxy-Lite, ``{1}`` with the ``fedavg`` aggregator plain FedAvg.
A layer that raises is logged and the round falls back to the safe aggregator
(coordinate-wise median of the integrity-checked updates of active clients) instead
of crashing; the report says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.defense.galaxy import GalaxyScreen, GalaxyScreenConfig
from protogalaxy.defense.reputation import (
    ReputationConfig,
    ReputationEvent,
    ReputationTracker,
)
from protogalaxy.defense.robust import coordinate_median, get_aggregator
from protogalaxy.defense.statistical import StatisticsConfig, StatisticsReport, screen

__all__ = [
    "ClientOutcome",
    "DefenseConfig",
    "GalaxyDefense",
    "GalaxyDefenseReport",
    "GlobalDefense",
    "GlobalDefenseReport",
]

_log = logging.getLogger("protogalaxy.defense")


@dataclass(frozen=True)
class DefenseConfig:
    layers: frozenset[int] = frozenset({1, 2, 3, 4, 5})
    aggregator: str = "multikrum"
    byzantine_fraction: float = 0.3
    trust_weighted: bool = False
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    galaxy: GalaxyScreenConfig = field(default_factory=GalaxyScreenConfig)

    def __post_init__(self) -> None:
        if not self.layers <= {1, 2, 3, 4, 5} or 1 not in self.layers:
            raise ValueError(
                f"layers must include 1 and lie within 1..5, got {sorted(self.layers)}"
            )
        get_aggregator(self.aggregator, byzantine_fraction=self.byzantine_fraction)


@dataclass
class ClientOutcome:
    client: int
    integrity: bool
    flagged: bool = False
    selected: bool = False
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    reputation: float | None = None
    status: str = "active"
    #: committed, then never revealed (layer 4 scores the round zero)
    withheld: bool = False


@dataclass
class GalaxyDefenseReport:
    round: int
    galaxy: int
    aggregate: torch.Tensor | None
    weight: int
    outcomes: dict[int, ClientOutcome]
    events: list[ReputationEvent]
    layer_flags: dict[str, int]
    fallback: str | None = None
    seconds: float = 0.0


@dataclass
class GlobalDefenseReport:
    aggregate: torch.Tensor | None
    accepted: list[int]
    excluded: dict[int, list[str]]
    metrics: dict[int, dict[str, float | None]]
    fallback: str | None = None
    #: accepted galaxies whose aggregate was scaled down by this factor (< 1)
    clipped: dict[int, float] = field(default_factory=dict)


class GalaxyDefense:
    """Layers 1-4 for one galaxy; keeps that galaxy's reputations."""

    def __init__(self, galaxy: int, config: DefenseConfig | None = None) -> None:
        self.galaxy = galaxy
        self.config = config or DefenseConfig()
        self.tracker = ReputationTracker(galaxy, self.config.reputation)
        self.aggregator = get_aggregator(
            self.config.aggregator, byzantine_fraction=self.config.byzantine_fraction
        )

    def active(self, client: int) -> bool:
        """May ``client`` take part in aggregation (not quarantined or banned)?"""
        return 4 not in self.config.layers or self.tracker.may_aggregate(client)

    def banned(self, client: int) -> bool:
        return 4 in self.config.layers and self.tracker.status(client) == "banned"

    def run(
        self,
        *,
        round: int,
        clients: list[int],
        updates: torch.Tensor,
        rejected: dict[int, str] | None = None,
        withheld: list[int] | None = None,
        reference_direction: torch.Tensor | None = None,
        evidence_for: Callable[[int], dict[str, Any]] | None = None,
    ) -> GalaxyDefenseReport:
        """Screen, aggregate and score one round.

        ``clients`` and the rows of ``updates`` are the reveals that passed layer 1;
        ``rejected`` maps the clients that failed layer 1 to the reason;
        ``withheld`` are the clients that committed and never revealed.
        """
        t0 = time.perf_counter()
        cfg = self.config
        rejected = dict(rejected or {})
        withheld = list(withheld or [])
        outcomes = {c: ClientOutcome(c, integrity=True) for c in clients}
        for c, reason in rejected.items():
            outcomes[c] = ClientOutcome(
                c, integrity=False, reasons=[f"integrity:{reason}"]
            )
        for c in withheld:
            outcomes[c] = ClientOutcome(
                c, integrity=False, reasons=["integrity:withheld"], withheld=True
            )
        flags = {
            "integrity": len(rejected),
            "withheld": len(withheld),
            "statistics": 0,
            "robust": 0,
            "quarantined": 0,
        }
        fallback = None
        aggregate: torch.Tensor | None = None
        weight = 0
        try:
            stats = self._layer2(clients, updates, reference_direction, outcomes)
            if stats is not None:
                flags["statistics"] = int(stats.flagged.sum())
            candidates = [
                i
                for i, c in enumerate(clients)
                if not outcomes[c].flagged and self.active(c)
            ]
            aggregate, weight = self._layer3(clients, updates, candidates, outcomes)
            flags["robust"] = sum(
                1 for i in candidates if not outcomes[clients[i]].selected
            )
        except Exception as exc:  # a defense bug must not take the round down
            _log.exception(
                "galaxy %d round %d: defense layer failed", self.galaxy, round
            )
            fallback = f"{type(exc).__name__}: {exc}"
            rows = [i for i, c in enumerate(clients) if self.active(c)]
            if rows:
                aggregate = coordinate_median(updates[rows]).aggregate
                weight = len(rows)
                for i in rows:
                    outcomes[clients[i]].selected = True
        events: list[ReputationEvent] = []
        if 4 in cfg.layers and fallback is None:
            events = self._layer4(round, outcomes, evidence_for)
        for o in outcomes.values():
            o.reputation = (
                self.tracker.reputation(o.client) if 4 in cfg.layers else None
            )
            o.status = self.tracker.status(o.client) if 4 in cfg.layers else "active"
        flags["quarantined"] = sum(1 for o in outcomes.values() if o.status != "active")
        return GalaxyDefenseReport(
            round,
            self.galaxy,
            aggregate,
            weight,
            outcomes,
            events,
            flags,
            fallback,
            time.perf_counter() - t0,
        )

    def _layer2(
        self,
        clients: list[int],
        updates: torch.Tensor,
        reference: torch.Tensor | None,
        outcomes: dict[int, ClientOutcome],
    ) -> StatisticsReport | None:
        if 2 not in self.config.layers or len(clients) < 3:
            return None
        stats = screen(
            updates, reference_direction=reference, config=self.config.statistics
        )
        for i, c in enumerate(clients):
            o = outcomes[c]
            o.metrics.update(stats.metrics(i))
            o.flagged = bool(stats.flagged[i])
            o.reasons += [f"statistics:{r}" for r in stats.reasons(i)]
        return stats

    def _layer3(
        self,
        clients: list[int],
        updates: torch.Tensor,
        candidates: list[int],
        outcomes: dict[int, ClientOutcome],
    ) -> tuple[torch.Tensor | None, int]:
        if not candidates:
            return None, 0
        x = updates[candidates] if len(candidates) < len(clients) else updates
        weights = None
        if self.config.trust_weighted and 4 in self.config.layers:
            weights = torch.tensor(
                [self.tracker.reputation(clients[i]) for i in candidates], dtype=x.dtype
            )
        aggregator = (
            self.aggregator if 3 in self.config.layers else get_aggregator("fedavg")
        )
        # f counts the Byzantine updates assumed among the *remaining* candidates: the
        # updates layers 2 and 4 already removed are presumed Byzantine and come off
        # the galaxy's budget floor(fraction * n), so a galaxy whose attackers are
        # quarantined stops discarding honest updates.
        removed = len(clients) - len(candidates)
        f = max(0, aggregator.f_for(len(clients)) - removed)
        if len(candidates) < aggregator.min_clients(f):
            aggregator = get_aggregator("median")  # too few for the configured rule
        result = aggregator(x, weights=weights, f=f)
        chosen = (
            [candidates[j] for j in range(len(candidates)) if bool(result.selected[j])]
            if result.selected is not None
            else candidates
        )
        for i in chosen:
            outcomes[clients[i]].selected = True
        if result.scores is not None:
            for j, i in enumerate(candidates):
                outcomes[clients[i]].metrics["krum_score"] = float(result.scores[j])
        for i in candidates:
            if i not in chosen:
                outcomes[clients[i]].reasons.append("robust:not_selected")
        return result.aggregate, len(chosen)

    def _layer4(
        self,
        round: int,
        outcomes: dict[int, ClientOutcome],
        evidence_for: Callable[[int], dict[str, Any]] | None,
    ) -> list[ReputationEvent]:
        events = []
        for c, o in sorted(outcomes.items()):
            evidence = dict(evidence_for(c)) if evidence_for else {}
            evidence["metrics"] = o.metrics
            event = self.tracker.observe(
                c,
                round=round,
                integrity=o.integrity,
                statistics=o.integrity and not o.flagged,
                selected=o.selected,
                withheld=o.withheld,
                reasons=tuple(o.reasons),
                evidence=evidence,
            )
            if o.withheld:
                # Every withholding is on record with the signed commitment that
                # proves the client took the round, not only status changes.
                events.append(
                    ReputationEvent(
                        "reveal_withheld",
                        c,
                        self.galaxy,
                        round,
                        self.tracker.reputation(c),
                        tuple(o.reasons),
                        evidence,
                    )
                )
            if event is not None:
                events.append(event)
        return events


class GlobalDefense:
    """Layer 5 and the combination of galaxy aggregates."""

    def __init__(self, config: DefenseConfig | None = None) -> None:
        self.config = config or DefenseConfig()
        self.screen = GalaxyScreen(self.config.galaxy)

    def run(
        self,
        aggregates: dict[int, tuple[torch.Tensor, int]],
        *,
        reference_direction: torch.Tensor | None = None,
        model_norm: float | None = None,
    ) -> GlobalDefenseReport:
        """Combine ``{galaxy: (aggregate, weight)}`` into the global update;
        ``model_norm`` is the norm of the model it will update (layer 5 bounds a
        galaxy's aggregate by it)."""
        if not aggregates:
            return GlobalDefenseReport(None, [], {}, {})
        ids = sorted(aggregates)
        stacked = torch.stack([aggregates[g][0] for g in ids])
        excluded: dict[int, list[str]] = {}
        metrics: dict[int, dict[str, float | None]] = {}
        clipped: dict[int, float] = {}
        accepted = ids
        fallback = None
        if 5 in self.config.layers:
            try:
                rep = self.screen.screen(
                    ids,
                    stacked,
                    reference_direction=reference_direction,
                    model_norm=model_norm,
                )
                accepted, excluded, metrics = rep.accepted, rep.excluded, rep.metrics
                clipped = rep.clipped
            except Exception as exc:
                _log.exception("layer 5 failed; combining galaxies by median")
                fallback = f"{type(exc).__name__}: {exc}"
                return GlobalDefenseReport(
                    coordinate_median(stacked).aggregate, ids, {}, {}, fallback
                )
        if not accepted:
            return GlobalDefenseReport(None, [], excluded, metrics, fallback, clipped)
        w = torch.tensor([float(aggregates[g][1]) for g in accepted])
        rows = torch.stack([aggregates[g][0] * clipped.get(g, 1.0) for g in accepted])
        combined = (w / w.sum()).to(rows.dtype) @ rows
        return GlobalDefenseReport(
            combined, accepted, excluded, metrics, fallback, clipped
        )

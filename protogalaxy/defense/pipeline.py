"""The defense pipeline: layers 1 to 4 in a galaxy, layer 5 at the global aggregator.

Which layers run is configuration: ``{1, 2, 3, 4, 5}`` is ProtoGalaxy-Full,
``{1, 3}`` ProtoGalaxy-Lite, ``{1}`` with the ``fedavg`` aggregator plain FedAvg.
A layer that raises is logged and the round falls back to the safe aggregator
(coordinate-wise median of the integrity-checked updates of active clients) instead
of crashing; the report says so.

Replay. An auditor runs the same code on the same revealed updates with the
decisions a galaxy published (:class:`ReplayHints`). Everything that follows from
exact data is recomputed and must agree; where float kernels may differ between
machines, the published decision is taken if it is within :data:`TOLERANCE` of
what the auditor computes (a layer-2 test value within tolerance of its threshold,
Multi-Krum scores at the selection boundary within tolerance of each other,
Weiszfeld weights within tolerance), and :class:`ReplayMismatch` is raised
otherwise. The aggregate itself is exact (:mod:`protogalaxy.defense.exact`), so it
must then match bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from protogalaxy.defense.exact import MAX_WEIGHT, quantize_weights
from protogalaxy.defense.galaxy import GalaxyScreen, GalaxyScreenConfig, _norms
from protogalaxy.defense.reputation import (
    ReputationConfig,
    ReputationEvent,
    ReputationTracker,
)
from protogalaxy.defense.robust import (
    AggregationResult,
    coordinate_median,
    get_aggregator,
    weighted_mean,
)
from protogalaxy.defense.statistical import StatisticsConfig, StatisticsReport, screen

__all__ = [
    "TOLERANCE",
    "ClientOutcome",
    "DefenseConfig",
    "GalaxyDefense",
    "GalaxyDefenseReport",
    "GlobalDefense",
    "GlobalDefenseReport",
    "ReplayHints",
    "ReplayMismatch",
]

_log = logging.getLogger("protogalaxy.defense")

#: How far a decision value recomputed by an auditor may be from the galaxy's for
#: the galaxy's published decision to stand: relative to ``max(1, |threshold|)``
#: for layer-2 tests, to ``max(1, |score|)`` at the Multi-Krum boundary, absolute
#: on normalized Weiszfeld weights. Float32 kernels on other machines differ by
#: ~1e-6 relative; 1e-4 leaves room and bounds what a galaxy could bend.
TOLERANCE: Final = 1e-4


class ReplayMismatch(Exception):
    """A published decision contradicts the auditor's recomputation by more than
    the tolerance (or cannot be taken at all)."""


@dataclass(frozen=True)
class ReplayHints:
    """The decisions a galaxy published for one round, per client: the layer-2
    tests it failed, whether layer 3 selected it and the integer weight it got."""

    flags: Mapping[int, frozenset[str]]
    selected: frozenset[int]
    weights: Mapping[int, int] | None = None
    #: the weight a zero update got in the mean (FLTrust), if the rule gives one
    null_weight: int | None = None


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
    #: the layer-2 tests it failed
    flags: list[str] = field(default_factory=list)
    #: may take part in layer 3 (not quarantined or banned before the round)
    active: bool = True
    #: its integer weight in the aggregate (rules that average rows)
    weight: int | None = None


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
    #: the rule that made the aggregate (``median`` when too few were left) and f
    rule: str | None = None
    f: int | None = None
    #: seconds in layers 2, 3 and 4 (``statistics``, ``robust``, ``reputation``)
    layer_seconds: dict[str, float] = field(default_factory=dict)
    #: the weight of a zero update in the aggregate (FLTrust), published
    null_weight: int | None = None


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
        hints: ReplayHints | None = None,
        server_update: torch.Tensor | None = None,
    ) -> GalaxyDefenseReport:
        """Screen, aggregate and score one round.

        ``clients`` and the rows of ``updates`` are the reveals that passed layer 1;
        ``rejected`` maps the clients that failed layer 1 to the reason;
        ``withheld`` are the clients that committed and never revealed;
        ``server_update`` is the global aggregator's update on its root dataset
        for rules that need one (FLTrust). With ``hints`` the round is replayed
        against a galaxy's published decisions (see the module docstring).
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
        rule: str | None = None
        f: int | None = None
        null_weight: int | None = None
        for c in clients:
            outcomes[c].active = self.active(c)
        timing: dict[str, float] = {}
        try:
            t_layer = time.perf_counter()
            stats = self._layer2(clients, updates, reference_direction, outcomes, hints)
            timing["statistics"] = time.perf_counter() - t_layer
            if stats is not None:
                flags["statistics"] = sum(1 for c in clients if outcomes[c].flagged)
            candidates = [
                i
                for i, c in enumerate(clients)
                if not outcomes[c].flagged and outcomes[c].active
            ]
            t_layer = time.perf_counter()
            aggregate, weight, rule, f, null_weight = self._layer3(
                clients, updates, candidates, outcomes, hints, server_update
            )
            timing["robust"] = time.perf_counter() - t_layer
            flags["robust"] = sum(
                1 for i in candidates if not outcomes[clients[i]].selected
            )
        except ReplayMismatch:
            raise
        except Exception as exc:  # a defense bug must not take the round down
            _log.exception(
                "galaxy %d round %d: defense layer failed", self.galaxy, round
            )
            fallback = f"{type(exc).__name__}: {exc}"
            rule, f, null_weight = "median", None, None
            rows = [i for i, c in enumerate(clients) if outcomes[c].active]
            for o in outcomes.values():
                o.selected, o.weight = False, None
            if rows:
                aggregate = coordinate_median(updates[rows]).aggregate
                weight = len(rows)
                for i in rows:
                    outcomes[clients[i]].selected = True
        events: list[ReputationEvent] = []
        if 4 in cfg.layers and fallback is None:
            t_layer = time.perf_counter()
            events = self._layer4(round, outcomes, evidence_for)
            timing["reputation"] = time.perf_counter() - t_layer
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
            rule,
            f,
            timing,
            null_weight,
        )

    def _layer2(
        self,
        clients: list[int],
        updates: torch.Tensor,
        reference: torch.Tensor | None,
        outcomes: dict[int, ClientOutcome],
        hints: ReplayHints | None = None,
    ) -> StatisticsReport | None:
        if 2 not in self.config.layers or len(clients) < 3:
            if hints is not None and any(hints.flags.get(c) for c in clients):
                raise ReplayMismatch("layer-2 flags published where layer 2 ran not")
            return None
        stats = screen(
            updates, reference_direction=reference, config=self.config.statistics
        )
        need = self.config.statistics.min_failures
        for i, c in enumerate(clients):
            o = outcomes[c]
            o.metrics.update(stats.metrics(i))
            failed = stats.reasons(i)
            if hints is not None:
                failed = _replay_tests(c, stats.decisions(i), hints.flags.get(c))
            o.flags = sorted(failed)
            o.flagged = len(failed) >= need
            o.reasons += [f"statistics:{r}" for r in o.flags]
        return stats

    def _layer3(
        self,
        clients: list[int],
        updates: torch.Tensor,
        candidates: list[int],
        outcomes: dict[int, ClientOutcome],
        hints: ReplayHints | None = None,
        server_update: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, int, str | None, int | None, int | None]:
        if not candidates:
            return None, 0, None, None, None
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
        result = aggregator(x, weights=weights, f=f, server_update=server_update)
        if hints is not None:
            members = [clients[i] for i in candidates]
            result = _replay_layer3(aggregator.name, x, members, result, weights, hints)
        if result.weights is not None:
            for j, i in enumerate(candidates):
                outcomes[clients[i]].weight = result.weights[j]
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
        if result.trust is not None:
            for j, i in enumerate(candidates):
                outcomes[clients[i]].metrics["trust_score"] = float(result.trust[j])
        for i in candidates:
            if i not in chosen:
                outcomes[clients[i]].reasons.append("robust:not_selected")
        if not chosen:  # FLTrust trusted no one: the galaxy contributes nothing
            return None, 0, aggregator.name, f, result.null_weight
        return result.aggregate, len(chosen), aggregator.name, f, result.null_weight

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
            if not o.integrity:
                # Every withholding and layer-1 rejection is on record (with the
                # signed commitment, and the client's signed reveal if any), not
                # only status changes.
                events.append(
                    ReputationEvent(
                        "reveal_withheld" if o.withheld else "reveal_rejected",
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


def _near(value: float, threshold: float, scale: float) -> bool:
    return abs(value - threshold) <= TOLERANCE * max(1.0, abs(scale))


def _replay_tests(
    client: int,
    decisions: dict[str, tuple[float, float, bool]],
    published: frozenset[str] | None,
) -> list[str]:
    """The layer-2 tests ``client`` failed, as published when every published
    decision is within tolerance of the recomputed one."""
    published = published or frozenset()
    unknown = published - decisions.keys()
    if unknown:
        raise ReplayMismatch(f"client {client}: no such layer-2 test {sorted(unknown)}")
    for test, (value, threshold, above) in decisions.items():
        fails = value > threshold if above else value < threshold
        if fails != (test in published) and not _near(value, threshold, threshold):
            raise ReplayMismatch(
                f"client {client}: layer-2 test {test} published as "
                f"{'failed' if test in published else 'passed'}, but its value "
                f"{value:.6g} is clearly on the other side of {threshold:.6g}"
            )
    return sorted(published)


def _replay_layer3(
    rule: str,
    x: torch.Tensor,
    members: list[int],
    result: AggregationResult,
    trust: torch.Tensor | None,
    hints: ReplayHints,
) -> AggregationResult:
    """Layer 3 with the galaxy's published selection or weights, where they are
    consistent with the recomputation within tolerance."""
    chosen = [c in hints.selected for c in members]
    if rule == "fltrust":
        return _replay_fltrust(x, members, result, chosen, hints)
    if hints.null_weight is not None and rule != "fltrust":
        raise ReplayMismatch(
            f"{rule}: a zero-update weight published for a rule without one"
        )
    if result.scores is not None:  # Krum, Multi-Krum: a selection by score
        assert result.selected is not None
        m = int(result.selected.sum())
        if sum(chosen) != m:
            raise ReplayMismatch(
                f"{rule}: {sum(chosen)} updates published as selected, {m} expected"
            )
        scores = [float(v) for v in result.scores]
        inside = max(s for s, c in zip(scores, chosen, strict=True) if c)
        outside = [s for s, c in zip(scores, chosen, strict=True) if not c]
        if (
            outside
            and inside > min(outside)
            and not _near(inside, min(outside), inside)
        ):
            raise ReplayMismatch(
                f"{rule}: a published selection leaves out a score of "
                f"{min(outside):.6g} and keeps one of {inside:.6g}"
            )
        mask = torch.tensor(chosen, dtype=torch.bool, device=x.device)
        w = [int(c) for c in chosen]
        if trust is not None:
            q = quantize_weights(trust.clamp(min=0))
            w = (
                [c * t for c, t in zip(w, q, strict=True)]
                if sum(c * t for c, t in zip(w, q, strict=True)) > 0
                else w
            )
        if list(result.weights or ()) == w:
            return result
        return AggregationResult(weighted_mean(x, w), mask, result.scores, tuple(w))
    if result.selected is not None:  # Bulyan: a selection by repeated Krum
        if chosen != [bool(v) for v in result.selected.tolist()]:
            raise ReplayMismatch(
                f"{rule}: the published selection is not the recomputed one"
            )
        return result
    if not all(chosen):
        raise ReplayMismatch(f"{rule}: every candidate takes part, some published not")
    if rule in ("geometric_median", "centered_clipping"):  # float-iteration weights
        published = [int((hints.weights or {}).get(c, -1)) for c in members]
        if any(v < 0 for v in published) or sum(published) <= 0:
            raise ReplayMismatch(f"{rule}: published weights are missing")
        mine = list(result.weights or ())
        _check_weights(rule, x, published, mine)
        if mine == published:
            return result
        return AggregationResult(weighted_mean(x, published), weights=tuple(published))
    return result


def _check_weights(
    rule: str,
    x: torch.Tensor,
    published: list[int],
    mine: list[int],
    null: tuple[int, int] = (0, 0),
) -> None:
    """Published real-valued weights (quantized) stand when they move the
    aggregate by at most :data:`TOLERANCE` of the rule's own weighted norm:
    ``sum_i |p_i/P - q_i/Q| |x_i| <= TOLERANCE * sum_i (q_i/Q) |x_i|``, with ``P``
    and ``Q`` including the zero update's weights ``null`` (published,
    recomputed), and no weight where the rule gives none. Two bounds a review
    broke: each normalized weight alone within 1e-4 (a galaxy gave a colluding
    update of norm 1e6 1e-4 of the weight and turned the aggregate around), and
    1e-4 of the median row norm (colluders that are most of a galaxy send huge
    untrusted rows and the median is theirs). The rule's own weighted norm is
    what the honest aggregate is made of; float differences between machines
    move the weights by about 1e-7 of themselves, far inside it."""
    if any(v < 0 or v >= MAX_WEIGHT for v in [*published, null[0]]):
        raise ReplayMismatch(f"{rule}: a published weight is not in [0, 2^29)")
    if len(published) != len(mine) or sum(published) <= 0 or sum(mine) <= 0:
        raise ReplayMismatch(f"{rule}: published weights differ")
    if any(p > 0 and q == 0 for p, q in zip(published, mine, strict=True)) or (
        null[0] > 0 and null[1] == 0
    ):
        raise ReplayMismatch(f"{rule}: weight published where the rule gives none")
    norms = _norms(x).cpu()
    total_p, total_m = sum(published) + null[0], sum(mine) + null[1]
    moved = sum(
        abs(p / total_p - q / total_m) * float(n)
        for p, q, n in zip(published, mine, norms, strict=True)
    )
    scale = sum(q / total_m * float(n) for q, n in zip(mine, norms, strict=True))
    if moved > TOLERANCE * scale:
        raise ReplayMismatch(
            f"{rule}: published weights differ (they move the aggregate by "
            f"{moved:.3g}, more than {TOLERANCE} of its own {scale:.3g})"
        )


def _replay_fltrust(
    x: torch.Tensor,
    members: list[int],
    result: AggregationResult,
    chosen: list[bool],
    hints: ReplayHints,
) -> AggregationResult:
    """FLTrust's weights are a float function of the rows (their norms and their
    cosines with the server update): the published ones stand within
    :func:`_check_weights`' bound, no row the rule gives no weight gets any, and
    a row is selected exactly when its published weight is positive."""
    published = [int((hints.weights or {}).get(c, 0) or 0) for c in members]
    if any(v < 0 or v >= MAX_WEIGHT for v in published):
        raise ReplayMismatch("fltrust: a published weight is not in [0, 2^29)")
    if chosen != [v > 0 for v in published]:
        raise ReplayMismatch(
            "fltrust: the published selection is not the published positive weights"
        )
    mine = list(result.weights or (0,) * len(members))
    if sum(published) == 0 or sum(mine) == 0:
        if sum(published) != sum(mine):
            raise ReplayMismatch("fltrust: published weights differ")
        return result
    if any(p > 0 and q == 0 for p, q in zip(published, mine, strict=True)):
        raise ReplayMismatch("fltrust: weight published for an update it trusts not")
    null = hints.null_weight
    if null is None or not isinstance(null, int):
        raise ReplayMismatch("fltrust: the zero update's weight is not published")
    _check_weights("fltrust", x, published, mine, (null, result.null_weight or 0))
    if mine == published and null == result.null_weight:
        return result
    mask = torch.tensor(chosen, dtype=torch.bool, device=x.device)
    return AggregationResult(
        weighted_mean(x, published, null_weight=null),
        mask,
        weights=tuple(published),
        trust=result.trust,
        null_weight=null,
    )


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
        rows = torch.stack([aggregates[g][0] * clipped.get(g, 1.0) for g in accepted])
        # The galaxies' signed weights (update counts) as integers: the combined
        # update is the ordered float64 mean, reproducible by anyone.
        combined = weighted_mean(rows, [int(aggregates[g][1]) for g in accepted])
        return GlobalDefenseReport(
            combined, accepted, excluded, metrics, fallback, clipped
        )

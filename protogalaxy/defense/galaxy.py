"""Layer 5: screening the galaxies themselves.

A galaxy aggregator can be compromised, or a galaxy can be captured by colluding
clients. The global aggregator screens galaxy aggregates the way a galaxy screens
clients, with three tests:

``norm``
    robust z-score of the aggregate's norm against the other galaxies' (> ``norm_k``);
``direction``
    cosine with the running mean of accepted global aggregates
    (< ``cosine_threshold``; skipped without history);
``agreement``
    cosine with the coordinate-wise median of all galaxy aggregates
    (< ``agreement_threshold``).

A galaxy failing ``min_failures`` (2) tests is excluded from this round's global
aggregate. A norm that is too large is never applied as it is, even when it is the
only test that fails: the aggregate is *clipped* to the largest norm the test accepts
(``median + norm_k * 1.4826 MAD`` of the galaxies' norms), against history to
``max_norm_growth`` times the median norm accepted over the last rounds, and always
to ``max_update_ratio`` times the model's own norm (at least 1): with fewer than
three galaxies and no history yet, that is the bound. History only learns from
rounds with three or more accepted galaxies, so a galaxy alone in a round cannot
drag the reference down (and every later honest aggregate with it).

Why clip rather than exclude on the norm alone: with non-IID data an honest galaxy's
aggregate can be legitimately larger than the others' while pointing the right way;
clipping keeps its direction and bounds what any galaxy can move the model to what a
galaxy of ordinary norm could, so a galaxy that sends 1000x the reference direction
moves the model no further than an honest one. Exclusion stays for aggregates that
also point elsewhere (two failed tests).

Galaxy reputation follows the same EWMA as clients,
``R <- (1 - lam) R + lam (1 - failures / 3)``, and a galaxy whose reputation falls
below ``exclude_below`` stays excluded until it recovers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.defense.statistical import robust_center_scale

__all__ = ["GalaxyScreen", "GalaxyScreenConfig", "GalaxyScreenReport"]

#: rounds of accepted norms the history bound looks back on
_HISTORY = 5


@dataclass(frozen=True)
class GalaxyScreenConfig:
    norm_k: float = 3.0
    cosine_threshold: float = 0.0
    agreement_threshold: float = 0.0
    min_failures: int = 2
    initial: float = 0.5
    lam: float = 0.2
    exclude_below: float = 0.3
    max_norm_growth: float = 10.0
    max_update_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.norm_k <= 0:
            raise ValueError("norm_k must be > 0")
        if not 1 <= self.min_failures <= 3:
            raise ValueError(f"min_failures must be in [1, 3], got {self.min_failures}")
        if not 0 < self.lam <= 1 or not 0 <= self.exclude_below <= 1:
            raise ValueError("need 0 < lam <= 1 and 0 <= exclude_below <= 1")
        if self.max_norm_growth <= 1:
            raise ValueError(f"max_norm_growth must be > 1, got {self.max_norm_growth}")
        if self.max_update_ratio <= 0:
            raise ValueError(
                f"max_update_ratio must be > 0, got {self.max_update_ratio}"
            )


@dataclass
class GalaxyScreenReport:
    accepted: list[int]
    excluded: dict[int, list[str]]
    metrics: dict[int, dict[str, float | None]] = field(default_factory=dict)
    reputations: dict[int, float] = field(default_factory=dict)
    #: accepted galaxies whose aggregate is scaled down by this factor (< 1)
    clipped: dict[int, float] = field(default_factory=dict)


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norms in float64, a row at a time: a float32 row near the largest float32
    values has a norm (and squares) that float32 cannot hold."""
    return torch.stack(
        [torch.linalg.vector_norm(row, dtype=torch.float64) for row in rows]
    )


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` scaled to unit length (0 for 0) without overflow or underflow:
    first by their largest magnitude, then by the norm of what is left (>= 1)."""
    rows = v.reshape(-1, v.shape[-1])
    peak = rows.abs().amax(dim=1, keepdim=True)
    scaled = rows / torch.where(peak > 0, peak, torch.ones_like(peak))
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    out = scaled / torch.where(norm > 0, norm, torch.ones_like(norm))
    return out.reshape(v.shape)


class GalaxyScreen:
    """Screens galaxy aggregates and keeps galaxy reputations."""

    def __init__(self, config: GalaxyScreenConfig | None = None) -> None:
        self.config = config or GalaxyScreenConfig()
        self.reputation: dict[int, float] = {}
        #: median norm of the accepted aggregates, one per recent round
        self.norm_history: list[float] = []

    def _norm_test(
        self, norms: torch.Tensor, model_norm: float | None
    ) -> tuple[torch.Tensor, float]:
        """Which norms fail the norm test, and the largest norm applied as it is.

        Against the other galaxies (three or more): ``|robust z| > norm_k`` fails,
        and the bound is ``median + norm_k * 1.4826 MAD``. Against history:
        a norm above ``max_norm_growth`` times the median of the last rounds'
        accepted norms fails, and is the bound too. Against the model: a norm
        above ``max_update_ratio * max(1, model_norm)`` fails and is the bound.
        """
        cfg = self.config
        failed = torch.zeros(len(norms), dtype=torch.bool)
        bound = float("inf")
        if model_norm is not None:
            cap = cfg.max_update_ratio * max(1.0, model_norm)
            failed |= norms > cap
            bound = cap
        if len(norms) >= 3:
            med, scale = robust_center_scale(norms)
            failed |= ((norms - med) / scale).abs() > cfg.norm_k
            bound = med + cfg.norm_k * scale
        if self.norm_history:
            ref = float(torch.tensor(self.norm_history, dtype=torch.float64).median())
            failed |= norms > cfg.max_norm_growth * ref
            bound = min(bound, cfg.max_norm_growth * ref)
        return failed, bound

    def screen(
        self,
        galaxy_ids: list[int],
        aggregates: torch.Tensor,
        *,
        reference_direction: torch.Tensor | None = None,
        model_norm: float | None = None,
    ) -> GalaxyScreenReport:
        """Screen the galaxies' ``aggregates`` (rows, in ``galaxy_ids`` order);
        ``model_norm`` is the norm of the model they would update."""
        cfg = self.config
        n = len(galaxy_ids)
        x = aggregates.float()
        norms = _norms(x)
        failed: dict[str, torch.Tensor] = {}
        failed["norm"], bound = self._norm_test(norms, model_norm)
        # Cosines of unit vectors: no product of two large values can overflow.
        unit = _unit(x)
        cos = None
        if reference_direction is not None and float(reference_direction.norm()) > 0:
            cos = (unit @ _unit(reference_direction.float())).double()
            failed["direction"] = cos < cfg.cosine_threshold
        else:
            failed["direction"] = torch.zeros(n, dtype=torch.bool)
        if n >= 3:
            agree = (unit @ _unit(x.median(dim=0).values)).double()
            failed["agreement"] = agree < cfg.agreement_threshold
        else:
            agree = torch.ones(n, dtype=torch.float64)
            failed["agreement"] = torch.zeros(n, dtype=torch.bool)
        count = sum(m.int() for m in failed.values())
        assert isinstance(count, torch.Tensor)
        accepted: list[int] = []
        excluded: dict[int, list[str]] = {}
        metrics: dict[int, dict[str, float | None]] = {}
        clipped: dict[int, float] = {}
        for i, g in enumerate(galaxy_ids):
            reasons = [name for name, m in failed.items() if bool(m[i])]
            r = self.reputation.get(g, cfg.initial)
            r = (1 - cfg.lam) * r + cfg.lam * (1 - len(reasons) / 3)
            self.reputation[g] = r
            metrics[g] = {
                "norm": float(norms[i]),
                "norm_bound": None if bound == float("inf") else bound,
                "cosine": None if cos is None else float(cos[i]),
                "agreement": float(agree[i]),
            }
            if int(count[i]) >= cfg.min_failures:
                excluded[g] = reasons
            elif r < cfg.exclude_below:
                excluded[g] = [*reasons, "low_reputation"]
            else:
                accepted.append(g)
                if float(norms[i]) > bound:
                    clipped[g] = bound / float(norms[i])
                    metrics[g]["clip"] = clipped[g]
        # the accepted norms as applied, after clipping; only rounds with three or
        # more of them (a robust median) teach the history
        applied = [min(float(norms[galaxy_ids.index(g)]), bound) for g in accepted]
        if len(applied) >= 3:
            med = float(torch.tensor(applied, dtype=torch.float64).median())
            self.norm_history = [*self.norm_history, med][-_HISTORY:]
        return GalaxyScreenReport(
            accepted, excluded, metrics, dict(self.reputation), clipped
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "reputation": dict(self.reputation),
            "norm_history": list(self.norm_history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reputation = {int(k): float(v) for k, v in state["reputation"].items()}
        self.norm_history = [float(v) for v in state.get("norm_history", [])]

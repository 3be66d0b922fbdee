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
aggregate. Galaxy reputation follows the same EWMA as clients,
``R <- (1 - lam) R + lam (1 - failures / 3)``, and a galaxy whose reputation falls
below ``exclude_below`` stays excluded until it recovers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from protogalaxy.defense.statistical import robust_z

__all__ = ["GalaxyScreen", "GalaxyScreenConfig", "GalaxyScreenReport"]


@dataclass(frozen=True)
class GalaxyScreenConfig:
    norm_k: float = 3.0
    cosine_threshold: float = 0.0
    agreement_threshold: float = 0.0
    min_failures: int = 2
    initial: float = 0.5
    lam: float = 0.2
    exclude_below: float = 0.3

    def __post_init__(self) -> None:
        if self.norm_k <= 0:
            raise ValueError("norm_k must be > 0")
        if not 1 <= self.min_failures <= 3:
            raise ValueError(f"min_failures must be in [1, 3], got {self.min_failures}")
        if not 0 < self.lam <= 1 or not 0 <= self.exclude_below <= 1:
            raise ValueError("need 0 < lam <= 1 and 0 <= exclude_below <= 1")


@dataclass
class GalaxyScreenReport:
    accepted: list[int]
    excluded: dict[int, list[str]]
    metrics: dict[int, dict[str, float | None]] = field(default_factory=dict)
    reputations: dict[int, float] = field(default_factory=dict)


def _cosine(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = (x @ ref) / (
        torch.linalg.vector_norm(x, dim=1).clamp(min=1e-12)
        * torch.linalg.vector_norm(ref).clamp(min=1e-12)
    )
    return out


class GalaxyScreen:
    """Screens galaxy aggregates and keeps galaxy reputations."""

    def __init__(self, config: GalaxyScreenConfig | None = None) -> None:
        self.config = config or GalaxyScreenConfig()
        self.reputation: dict[int, float] = {}

    def screen(
        self,
        galaxy_ids: list[int],
        aggregates: torch.Tensor,
        *,
        reference_direction: torch.Tensor | None = None,
    ) -> GalaxyScreenReport:
        cfg = self.config
        n = len(galaxy_ids)
        x = aggregates.float()
        norms = torch.linalg.vector_norm(x, dim=1)
        failed: dict[str, torch.Tensor] = {}
        failed["norm"] = (
            robust_z(norms).abs() > cfg.norm_k
            if n >= 3
            else torch.zeros(n, dtype=torch.bool)
        )
        cos = None
        if reference_direction is not None and float(reference_direction.norm()) > 0:
            cos = _cosine(x, reference_direction.float())
            failed["direction"] = cos < cfg.cosine_threshold
        else:
            failed["direction"] = torch.zeros(n, dtype=torch.bool)
        if n >= 3:
            agree = _cosine(x, x.median(dim=0).values)
            failed["agreement"] = agree < cfg.agreement_threshold
        else:
            agree = torch.ones(n)
            failed["agreement"] = torch.zeros(n, dtype=torch.bool)
        count = sum(m.int() for m in failed.values())
        assert isinstance(count, torch.Tensor)
        accepted: list[int] = []
        excluded: dict[int, list[str]] = {}
        metrics: dict[int, dict[str, float | None]] = {}
        for i, g in enumerate(galaxy_ids):
            reasons = [name for name, m in failed.items() if bool(m[i])]
            r = self.reputation.get(g, cfg.initial)
            r = (1 - cfg.lam) * r + cfg.lam * (1 - len(reasons) / 3)
            self.reputation[g] = r
            metrics[g] = {
                "norm": float(norms[i]),
                "cosine": None if cos is None else float(cos[i]),
                "agreement": float(agree[i]),
            }
            if int(count[i]) >= cfg.min_failures:
                excluded[g] = reasons
            elif r < cfg.exclude_below:
                excluded[g] = [*reasons, "low_reputation"]
            else:
                accepted.append(g)
        return GalaxyScreenReport(accepted, excluded, metrics, dict(self.reputation))

    def state_dict(self) -> dict[str, Any]:
        return {"reputation": dict(self.reputation)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reputation = {int(k): float(v) for k, v in state["reputation"].items()}

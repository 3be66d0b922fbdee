"""Layer 2: statistical screening of a galaxy's updates.

Four tests per update; an update is *flagged* when at least ``min_failures`` (2) fail:

1. Norm deviation: robust z-score of its L2 norm against the galaxy's norms,
   ``|norm - median| / max(1.4826 MAD, norm_floor * median)``; fails above
   ``norm_k`` (3). Catches scaling and free-riding (near-zero updates). The floor
   (0.1) keeps a minority of rows at exactly the median norm from shrinking the
   spread until honest clients fail (what the adaptive attack did).
2. Direction: cosine similarity with the running mean of accepted aggregates; fails
   below ``cosine_threshold`` (0.5). Skipped while there is no history yet.
3. Coordinate-wise MAD outliers: the fraction of its coordinates further than
   ``mad_k`` robust standard deviations from the coordinate-wise median; fails when
   that fraction's robust z-score exceeds ``norm_k``.
4. Distribution shift: KL divergence of the histogram of its values from the
   galaxy's pooled histogram (shared bin edges); fails when the divergence's robust
   z-score exceeds ``norm_k``.

Robust z-scores (median and MAD, Hampel 1974) keep a Byzantine minority from hiding
itself by inflating the spread it is judged against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protogalaxy.defense.select import order_statistics

__all__ = [
    "StatisticsConfig",
    "StatisticsReport",
    "robust_center_scale",
    "robust_z",
    "screen",
]

_MAD_SCALE = 1.4826  # MAD of a normal distribution is 0.6745 sigma
_BLOCK = 1 << 16


@dataclass(frozen=True)
class StatisticsConfig:
    norm_k: float = 3.0
    cosine_threshold: float = 0.5
    mad_k: float = 3.0
    bins: int = 64
    min_failures: int = 2
    #: The norm test's spread is at least this share of the median norm: a
    #: minority sending rows of exactly the median norm (the adaptive attack)
    #: shrinks the MAD until honest clients' ordinary norm differences fail the
    #: test. 0 (off) reproduces the test as it was before the floor.
    norm_floor: float = 0.1

    def __post_init__(self) -> None:
        if self.norm_k <= 0 or self.mad_k <= 0:
            raise ValueError("norm_k and mad_k must be > 0")
        if not 0.0 <= self.norm_floor < 1.0:
            raise ValueError(f"norm_floor must be in [0, 1), got {self.norm_floor}")
        if not -1.0 <= self.cosine_threshold <= 1.0:
            raise ValueError(
                f"cosine_threshold must be in [-1, 1], got {self.cosine_threshold}"
            )
        if not 1 <= self.min_failures <= 4:
            raise ValueError(f"min_failures must be in [1, 4], got {self.min_failures}")
        if self.bins < 4:
            raise ValueError(f"bins must be >= 4, got {self.bins}")


@dataclass
class StatisticsReport:
    """Per-update metrics and test outcomes (tensors of length n)."""

    norm: torch.Tensor
    norm_z: torch.Tensor
    cosine: torch.Tensor | None
    outlier_fraction: torch.Tensor
    kl: torch.Tensor
    failed: dict[str, torch.Tensor] = field(default_factory=dict)
    flagged: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.bool)
    )
    #: robust z-scores of the outlier fractions and of the KL divergences
    outlier_z: torch.Tensor | None = None
    kl_z: torch.Tensor | None = None
    config: StatisticsConfig | None = None

    def decisions(self, i: int) -> dict[str, tuple[float, float, bool]]:
        """Per test, for update ``i``: ``(value, threshold, fails_above)``: the test
        fails when the value is above the threshold (or below, for
        ``fails_above=False``). What an auditor re-checks within a tolerance."""
        cfg = self.config or StatisticsConfig()
        assert self.outlier_z is not None and self.kl_z is not None
        out = {
            "norm": (abs(float(self.norm_z[i])), cfg.norm_k, True),
            "coordinate_outliers": (float(self.outlier_z[i]), cfg.norm_k, True),
            "distribution_shift": (float(self.kl_z[i]), cfg.norm_k, True),
        }
        if self.cosine is not None:
            out["direction"] = (float(self.cosine[i]), cfg.cosine_threshold, False)
        return out

    def reasons(self, i: int) -> list[str]:
        """Names of the tests update ``i`` failed."""
        return [name for name, mask in self.failed.items() if bool(mask[i])]

    def metrics(self, i: int) -> dict[str, float | None]:
        return {
            "norm": float(self.norm[i]),
            "norm_z": float(self.norm_z[i]),
            "cosine": None if self.cosine is None else float(self.cosine[i]),
            "outlier_fraction": float(self.outlier_fraction[i]),
            "kl": float(self.kl[i]),
        }


def robust_center_scale(
    values: torch.Tensor, *, eps: float = 1e-12
) -> tuple[float, float]:
    """``(median, 1.4826 * MAD)`` of ``values`` in float64; a zero MAD falls back to
    the mean absolute deviation so identical honest values do not make every
    difference infinite."""
    v = values.double()
    med = v.median()
    dev = (v - med).abs()
    scale = _MAD_SCALE * dev.median()
    if scale <= eps:
        scale = dev.mean() + eps
    return float(med), float(scale)


def robust_z(values: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """``(v - median) / (1.4826 * MAD)`` (see :func:`robust_center_scale`)."""
    med, scale = robust_center_scale(values, eps=eps)
    return ((values.double() - med) / scale).to(values.dtype)


def _outlier_fractions(x: torch.Tensor, mad_k: float) -> torch.Tensor:
    """Per row, the share of its coordinates further than ``mad_k`` robust standard
    deviations from the coordinate-wise (lower) median."""
    n, d = x.shape
    k = (n - 1) // 2  # the lower median, as torch.median
    counts = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start in range(0, d, _BLOCK):
        b = x[:, start : start + _BLOCK]
        med = order_statistics(b, [k])[0].to(b.device)
        dev = (b - med).abs()
        mad = _MAD_SCALE * order_statistics(dev, [k])[0].to(b.device)
        counts += (dev > mad_k * mad.clamp(min=1e-12)).sum(dim=1).double()
    return (counts / d).to(x.dtype)


def _quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """Linear-interpolation quantiles of a 1-D float64 tensor (``torch.quantile``'s
    definition), by selection instead of a full sort."""
    m = values.numel()
    pos = [q * (m - 1) for q in qs]
    ks = sorted({int(p) for p in pos} | {min(int(p) + 1, m - 1) for p in pos})
    picked = order_statistics(values.view(-1, 1), ks)[:, 0].tolist()
    at = dict(zip(ks, picked, strict=True))
    out = []
    for p in pos:
        lo = int(p)
        a, b = at[lo], at[min(lo + 1, m - 1)]
        out.append(a + (b - a) * (p - lo))
    return out


def _kl_to_pooled(x: torch.Tensor, bins: int) -> torch.Tensor:
    n = x.shape[0]
    flat = x.reshape(-1)
    sample = flat[
        torch.linspace(0, flat.numel() - 1, min(flat.numel(), 1 << 18)).long()
    ]
    lo, hi = _quantiles(sample.double().cpu(), [0.001, 0.999])
    if hi <= lo:
        hi = lo + 1.0
    # Values outside [lo, hi] land in the two edge bins, so heavy tails count.
    idx = (x.double() - lo).mul_((bins - 2) / (hi - lo)).floor_().clamp_(-1, bins - 2)
    rows = torch.arange(n, device=x.device).unsqueeze(1) * bins + 1
    flat_idx = idx.long().add_(rows).view(-1)
    hist = torch.bincount(flat_idx, minlength=n * bins).view(n, bins).double()
    p = (hist + 0.5) / (hist + 0.5).sum(dim=1, keepdim=True)
    q = hist.sum(dim=0) + 0.5
    q = q / q.sum()
    return (p * (p / q).log()).sum(dim=1).to(x.dtype)


def screen(
    updates: torch.Tensor,
    *,
    reference_direction: torch.Tensor | None = None,
    config: StatisticsConfig | None = None,
) -> StatisticsReport:
    """Run the four tests on the rows of ``updates`` (``(n, d)``, n >= 3)."""
    cfg = config or StatisticsConfig()
    if updates.dim() != 2 or updates.shape[0] < 3:
        raise ValueError(
            f"need updates of shape (n, d) with n >= 3, got {tuple(updates.shape)}"
        )
    x = updates.float()
    norm = torch.linalg.vector_norm(x, dim=1)
    med, scale = robust_center_scale(norm)
    scale = max(scale, cfg.norm_floor * abs(med))
    norm_z = ((norm.double() - med) / scale).to(norm.dtype)
    cosine = None
    if reference_direction is not None and float(reference_direction.norm()) > 0:
        ref = reference_direction.to(device=x.device, dtype=x.dtype)
        cosine = (x @ ref) / (norm.clamp(min=1e-12) * torch.linalg.vector_norm(ref))
    fractions = _outlier_fractions(x, cfg.mad_k)
    kl = _kl_to_pooled(x, cfg.bins)
    outlier_z, kl_z = robust_z(fractions), robust_z(kl)
    failed = {
        "norm": norm_z.abs() > cfg.norm_k,
        "direction": (
            cosine < cfg.cosine_threshold
            if cosine is not None
            else torch.zeros(len(x), dtype=torch.bool, device=x.device)
        ),
        "coordinate_outliers": outlier_z > cfg.norm_k,
        "distribution_shift": kl_z > cfg.norm_k,
    }
    count = sum(mask.int() for mask in failed.values())
    assert isinstance(count, torch.Tensor)
    return StatisticsReport(
        norm,
        norm_z,
        cosine,
        fractions,
        kl,
        failed,
        count >= cfg.min_failures,
        outlier_z,
        kl_z,
        cfg,
    )

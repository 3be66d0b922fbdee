"""Small statistics for the robustness tables: mean and sample standard
deviation, and the paired t-test (two-sided), with Student's t distribution from
the regularized incomplete beta function (Numerical Recipes' continued fraction),
so no SciPy is needed."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mean_std", "paired_t_test", "t_two_sided_p"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        raise ValueError("no values")
    m = math.fsum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    var = math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var)


def _beta_cf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean of a - b, two-sided p) over the pairs; p is 1.0 when the differences
    are all equal to zero, 0.0 when they are all equal and not zero, and NaN with
    fewer than two pairs."""
    if len(a) != len(b):
        raise ValueError("paired samples must have equal lengths")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan
    m, s = mean_std(diffs)
    if s == 0.0:
        return m, (1.0 if m == 0.0 else 0.0)
    t = m / (s / math.sqrt(len(diffs)))
    return m, t_two_sided_p(t, len(diffs) - 1)

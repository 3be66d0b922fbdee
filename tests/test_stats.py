"""The robustness tables' statistics against published values."""

from __future__ import annotations

import math

import pytest

from protogalaxy.stats import mean_std, paired_t_test, t_two_sided_p


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        # two-sided critical values of Student's t (standard tables)
        (2.776445105, 4, 0.05),
        (4.604094871, 4, 0.01),
        (2.228138852, 10, 0.05),
        (1.959963985, 10**6, 0.0500003),  # the normal limit, 1/df away
        (12.70620474, 1, 0.05),
        (0.0, 7, 1.0),
    ],
)
def test_t_distribution_matches_the_tables(t: float, df: int, p: float) -> None:
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-6, abs=1e-9)
    assert t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-6, abs=1e-9)


def test_paired_t_test_by_hand() -> None:
    a = [0.97, 0.96, 0.98, 0.97, 0.95]
    b = [0.95, 0.95, 0.96, 0.94, 0.94]
    diff, p = paired_t_test(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_std(d)
    t = m / (s / math.sqrt(5))
    assert diff == pytest.approx(0.018)
    assert p == pytest.approx(t_two_sided_p(t, 4))
    assert 0.001 < p < 0.01  # t = 5.01 on 4 degrees of freedom
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)
    assert math.isnan(paired_t_test([1.0], [0.5])[1])
    assert mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx(
        (5.0, 2.138089935)
    )

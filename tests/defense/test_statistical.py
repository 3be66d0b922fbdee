"""Layer 2: each test trips on the attack it is built for, and honest updates pass."""

from __future__ import annotations

import pytest
import torch

from protogalaxy.defense.statistical import StatisticsConfig, robust_z, screen

D = 21_840


@pytest.fixture
def galaxy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    direction = 0.01 * torch.randn(D, generator=g)
    honest = direction + 0.01 * torch.randn(7, D, generator=g)
    return honest, direction


def attack(name: str, honest: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return {
        "sign_flip": -honest[:3],
        "scaling": 10 * honest[:3],
        "gaussian": 0.05 * torch.randn(3, D, generator=g),
        "free_rider": 1e-6 * torch.randn(3, D, generator=g),
    }[name]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sign_flip", {"direction", "coordinate_outliers"}),
        ("scaling", {"norm", "coordinate_outliers", "distribution_shift"}),
        (
            "gaussian",
            {"norm", "direction", "coordinate_outliers", "distribution_shift"},
        ),
        ("free_rider", {"norm", "direction", "distribution_shift"}),
    ],
)
def test_attacks_are_flagged_by_the_right_tests(
    galaxy: tuple[torch.Tensor, torch.Tensor], name: str, expected: set[str]
) -> None:
    honest, direction = galaxy
    x = torch.cat([honest, attack(name, honest)])
    report = screen(x, reference_direction=direction)
    assert report.flagged.tolist() == [False] * 7 + [True] * 3
    for i in range(7, 10):
        assert set(report.reasons(i)) == expected
    for i in range(7):
        assert report.reasons(i) == []
    assert set(report.metrics(8)) == {
        "norm",
        "norm_z",
        "cosine",
        "outlier_fraction",
        "kl",
    }


def test_one_failed_test_is_not_enough(
    galaxy: tuple[torch.Tensor, torch.Tensor],
) -> None:
    honest, _ = galaxy
    # Honest updates against an unrelated reference: the absolute direction test
    # (direction_k null) fails for all of them, but nothing else does, so nobody
    # is flagged.
    other = torch.randn(D, generator=torch.Generator().manual_seed(9))
    absolute = StatisticsConfig(direction_k=None)
    report = screen(honest, reference_direction=other, config=absolute)
    assert report.failed["direction"].all()
    assert not report.flagged.any()
    strict = screen(
        honest,
        reference_direction=other,
        config=StatisticsConfig(min_failures=1, direction_k=None),
    )
    assert strict.flagged.all()


def test_a_direction_everyone_shares_is_not_evidence() -> None:
    """Under strong label skew every honest update is nearly orthogonal to the
    running mean of the aggregates (cosines near 0, measured on MNIST with
    Dirichlet(0.3)), so an absolute cosine threshold of 0.5 failed them all and one
    more failed test flagged them. The direction test fails only an update below
    both the threshold and the galaxy's own robust spread (median - k MAD): the
    skewed honest updates pass, sign-flipped ones among them still fail."""
    g = torch.Generator().manual_seed(3)
    reference = torch.randn(D, generator=g)
    # seven honest clients, each mostly its own direction, a little of the shared
    honest = 0.05 * reference + torch.randn(7, D, generator=g)
    flipped = -4 * honest[:3].mean(dim=0) - 2 * reference
    x = torch.cat([honest, flipped.expand(3, D)])
    report = screen(x, reference_direction=reference)
    assert report.cosine is not None
    assert (report.cosine[:7] < 0.5).all()  # the absolute test alone fails them all
    assert report.failed["direction"].tolist() == [False] * 7 + [True] * 3
    old = screen(
        x, reference_direction=reference, config=StatisticsConfig(direction_k=None)
    )
    assert old.failed["direction"].all()
    # what a replay re-checks: the threshold is the lower of the two bounds
    value, threshold, above = report.decisions(0)["direction"]
    assert not above and value >= threshold
    assert threshold < 0.5
    assert report.decisions(8)["direction"][0] < threshold


def test_without_history_the_direction_test_is_skipped(
    galaxy: tuple[torch.Tensor, torch.Tensor],
) -> None:
    honest, _ = galaxy
    report = screen(torch.cat([honest, -honest[:3]]), reference_direction=None)
    assert report.cosine is None and not report.failed["direction"].any()


def test_robust_z_and_validation() -> None:
    z = robust_z(torch.tensor([1.0, 1.1, 0.9, 1.0, 50.0]))
    assert z[-1] > 100 and z[:4].abs().max() < 3
    same = robust_z(torch.tensor([2.0, 2.0, 2.0, 5.0]))
    assert torch.isfinite(same).all() and same[-1] > 1
    with pytest.raises(ValueError, match="n >= 3"):
        screen(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="cosine_threshold"):
        StatisticsConfig(cosine_threshold=2.0)
    with pytest.raises(ValueError, match="min_failures"):
        StatisticsConfig(min_failures=0)
    with pytest.raises(ValueError, match="direction_k"):
        StatisticsConfig(direction_k=0.0)

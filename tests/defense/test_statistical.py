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
    # Honest updates against an unrelated reference: the direction test fails for
    # all of them, but nothing else does, so nobody is flagged.
    other = torch.randn(D, generator=torch.Generator().manual_seed(9))
    report = screen(honest, reference_direction=other)
    assert report.failed["direction"].all()
    assert not report.flagged.any()
    strict = screen(
        honest, reference_direction=other, config=StatisticsConfig(min_failures=1)
    )
    assert strict.flagged.all()


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


def test_rows_at_the_median_norm_cannot_frame_honest_clients() -> None:
    """What the adaptive attack did (issue 16): three identical rows of exactly
    the median norm shrink the norm test's MAD until honest clients' ordinary
    norm differences fail it (and with the direction test, which skewed honest
    clients fail anyway, that flags them). With the floor on the spread the
    attackers no longer decide the honest clients' verdict; a scaled update and
    a free rider still fail the norm test."""
    g = torch.Generator().manual_seed(7)
    honest = torch.randn(7, D, generator=g)
    honest *= torch.tensor([0.8, 0.95, 0.98, 1.0, 1.02, 1.05, 1.2]).unsqueeze(1)
    median = float(honest.norm(dim=1).median())
    evil = torch.randn(D, generator=g)
    evil = (evil * median / evil.norm()).expand(3, -1)
    x = torch.cat([honest, evil])
    floorless = StatisticsConfig(norm_floor=0.0)
    alone = screen(honest, config=floorless)
    assert not bool(alone.failed["norm"].any())  # among themselves, all fine
    off = screen(x, config=floorless)
    assert off.failed["norm"][:7].tolist() == [True] + [False] * 5 + [True]
    assert StatisticsConfig().norm_floor == 0.1
    on = screen(x, config=StatisticsConfig())
    assert not bool(on.failed["norm"][:7].any())
    for bad in (10 * honest[:3], 1e-6 * honest[:3]):
        out = screen(torch.cat([honest, bad]), config=StatisticsConfig())
        assert bool(out.failed["norm"][7:].all())

"""The pipeline: layer selection, fallback on a failing layer, layer 5."""

from __future__ import annotations

import math

import pytest
import torch

from protogalaxy.defense.galaxy import GalaxyScreen
from protogalaxy.defense.pipeline import DefenseConfig, GalaxyDefense, GlobalDefense
from protogalaxy.defense.robust import (
    Aggregator,
    register_aggregator,
)


@register_aggregator
class _Exploding(Aggregator):
    name = "test_exploding"

    def _aggregate(self, updates, f, weights):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


def galaxy_updates(n: int = 10, byz: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(500, generator=g)
    x = base + 0.1 * torch.randn(n, 500, generator=g)
    x[n - byz :] = -5 * x[n - byz :]
    return x


def test_full_pipeline_excludes_attackers() -> None:
    x = galaxy_updates()
    d = GalaxyDefense(0, DefenseConfig())
    report = d.run(
        round=0, clients=list(range(10)), updates=x, reference_direction=x[0]
    )
    assert report.fallback is None
    assert [c for c, o in report.outcomes.items() if o.selected] == list(range(7))
    assert all(report.outcomes[c].flagged for c in (7, 8, 9))
    assert report.layer_flags["statistics"] == 3
    assert torch.allclose(report.aggregate, x[:7].mean(0), atol=1e-5)


def test_lite_and_fedavg_configurations() -> None:
    x = galaxy_updates()
    lite = GalaxyDefense(0, DefenseConfig(layers=frozenset({1, 3})))
    r = lite.run(round=0, clients=list(range(10)), updates=x)
    assert not any(o.flagged for o in r.outcomes.values())  # no layer 2
    assert r.outcomes[9].reputation is None  # no layer 4
    assert not r.outcomes[9].selected and r.outcomes[0].selected
    plain = GalaxyDefense(0, DefenseConfig(layers=frozenset({1}), aggregator="fedavg"))
    p = plain.run(round=0, clients=list(range(10)), updates=x)
    assert torch.allclose(p.aggregate, x.mean(0), atol=1e-5)


def test_a_failing_layer_falls_back_to_the_median() -> None:
    x = galaxy_updates()
    d = GalaxyDefense(0, DefenseConfig(aggregator="test_exploding"))
    report = d.run(round=0, clients=list(range(10)), updates=x)
    assert report.fallback == "RuntimeError: boom"
    # the mean of the two middle values (n = 10)
    assert torch.allclose(report.aggregate, x.quantile(0.5, dim=0), atol=1e-6)
    assert report.events == []  # reputations are not touched by a failed round


def test_integrity_rejections_count_against_reputation() -> None:
    x = galaxy_updates(byz=0)
    d = GalaxyDefense(0, DefenseConfig())
    report = d.run(
        round=0, clients=list(range(9)), updates=x[:9], rejected={9: "non_finite"}
    )
    assert not report.outcomes[9].integrity and report.layer_flags["integrity"] == 1
    lam = d.config.reputation.lam
    assert d.tracker.reputation(9) == pytest.approx(0.5 * (1 - lam))  # B = 0


def test_layer5_excludes_a_compromised_galaxy() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, generator=g)
    aggs = {i: (base + 0.05 * torch.randn(300, generator=g), 10) for i in range(4)}
    aggs[2] = (-8 * aggs[2][0], 10)  # a galaxy aggregator that tampers
    gd = GlobalDefense(DefenseConfig())
    report = gd.run(aggs, reference_direction=base)
    assert report.accepted == [0, 1, 3]
    assert set(report.excluded[2]) >= {"norm", "direction", "agreement"}
    expected = torch.stack([aggs[i][0] for i in (0, 1, 3)]).mean(0)
    assert torch.allclose(report.aggregate, expected, atol=1e-6)
    # Without layer 5 the tampered galaxy drags the global update backwards.
    off = GlobalDefense(DefenseConfig(layers=frozenset({1, 2, 3, 4})))
    assert float(off.run(aggs).aggregate @ base) < 0


def test_galaxy_reputation_keeps_a_repeat_offender_out() -> None:
    screen = GalaxyScreen()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(100, generator=g)
    for _ in range(8):  # R = 0.5 * 0.8**8 = 0.08; one clean round brings it to 0.27
        x = base + 0.05 * torch.randn(4, 100, generator=g)
        x[3] = -10 * x[3]
        screen.screen([0, 1, 2, 3], x, reference_direction=base)
    assert screen.reputation[3] < 0.3 < screen.reputation[0]
    # Now galaxy 3 behaves, but its reputation still keeps it out for a while.
    clean = base + 0.05 * torch.randn(4, 100, generator=g)
    rep = screen.screen([0, 1, 2, 3], clean, reference_direction=base)
    assert rep.excluded == {3: ["low_reputation"]}
    restored = GalaxyScreen()
    restored.load_state_dict(screen.state_dict())
    assert restored.reputation == screen.reputation


def honest_galaxies(n: int = 3, d: int = 300, seed: int = 2) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    return {i: base + 0.3 * torch.randn(d, generator=g) for i in range(n)}


@pytest.mark.parametrize("scale", [1000.0, 3.0e30])
def test_layer5_clips_a_galaxy_that_only_fails_the_norm_test(scale: float) -> None:
    """A galaxy sending a huge multiple of the reference direction passes the
    direction and agreement tests; its norm alone is enough to clip it to the
    largest norm the test accepts, so it moves the model no further than an
    honest galaxy could."""
    aggs = honest_galaxies()
    ref = torch.stack(list(aggs.values())).mean(0)
    honest_step = ref.norm()
    attack = {**{g: (v, 10) for g, v in aggs.items()}, 0: (scale * ref, 10)}
    gd = GlobalDefense(DefenseConfig())
    report = gd.run(attack, reference_direction=ref)
    assert report.excluded == {} and 0 in report.clipped
    norms = [float(v.norm()) for v in aggs.values()]
    assert report.metrics[0]["norm_bound"] < 2 * max(norms)
    assert report.aggregate is not None and torch.isfinite(report.aggregate).all()
    assert float(report.aggregate.norm()) <= 1.5 * float(honest_step)
    # Without the clip (or with layer 5 off) the step is hundreds of times larger.
    off = GlobalDefense(DefenseConfig(layers=frozenset({1, 2, 3, 4})))
    combined = off.run(attack).aggregate
    assert not torch.isfinite(combined).all() or float(combined.norm()) > 100 * float(
        honest_step
    )


def test_layer5_bounds_a_galaxy_by_the_model_with_two_galaxies() -> None:
    """With two galaxies no robust z-score exists and, at the start, no history:
    the model's own norm bounds what one galaxy can move it by."""
    aggs = honest_galaxies(2)
    blown = {0: (aggs[0], 5), 1: (torch.full_like(aggs[1], 3.0e38), 5)}
    report = GlobalDefense(DefenseConfig()).run(blown, model_norm=5.5)
    assert 1 in report.clipped and report.metrics[1]["norm_bound"] == 5.5
    assert report.aggregate is not None
    assert float(report.aggregate.norm()) <= 5.5


def test_layer5_history_learns_only_from_three_or_more_galaxies() -> None:
    """A galaxy alone with one other in a round cannot drag the history's reference
    down and clip every honest aggregate after it (found by an attack review)."""
    aggs = honest_galaxies(3)
    gd = GlobalDefense(DefenseConfig())
    gd.run({0: (aggs[0], 5), 2: (1e-30 * aggs[2], 5)}, model_norm=5.5)
    assert gd.screen.norm_history == []
    report = gd.run({g: (v, 5) for g, v in aggs.items()}, model_norm=5.5)
    # (three similar norms: the robust z-test may trim the largest a hair; the
    # poisoned history would have scaled every aggregate by ~1e-29)
    assert report.excluded == {} and min(report.clipped.values(), default=1) > 0.9
    assert len(gd.screen.norm_history) == 1
    # With history, growth beyond max_norm_growth is clipped even with two.
    later = gd.run({0: (aggs[0], 5), 1: (50 * aggs[1], 5)}, model_norm=500.0)
    assert 1 in later.clipped


def test_layer5_tests_survive_the_largest_float32_values() -> None:
    aggs = honest_galaxies()
    huge = torch.full((300,), 3.0e38)
    report = GlobalDefense(DefenseConfig()).run(
        {0: (huge, 1), 1: (aggs[1], 1), 2: (aggs[2], 1)}
    )
    m = report.metrics[0]
    assert all(v is None or math.isfinite(v) for v in m.values()), m
    assert 0 in report.excluded or 0 in report.clipped
    assert report.aggregate is not None and torch.isfinite(report.aggregate).all()

"""Layer 3: robust aggregation, checked against exact float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protogalaxy.defense.robust import (
    Aggregator,
    available_aggregators,
    coordinate_median,
    geometric_median,
    get_aggregator,
    krum_scores,
    multi_krum,
    pairwise_sq_distances,
    register_aggregator,
    trimmed_mean,
)


def exact_multi_krum_selection(x: torch.Tensor, f: int) -> set[int]:
    d = torch.cdist(x.double(), x.double()) ** 2
    scores = krum_scores(d, f)
    return set(torch.sort(scores, stable=True).indices[: x.shape[0] - f].tolist())


def test_distances_survive_a_large_common_offset() -> None:
    # Updates that share a large component: the naive float32 Gram formula cancels
    # (negative squared distances, errors of many orders of magnitude).
    g = torch.Generator().manual_seed(0)
    n, d = 12, 200_000
    x = 100.0 + 0.01 * torch.randn(n, d, generator=g)
    exact = torch.cdist(x.double(), x.double()) ** 2
    ours = pairwise_sq_distances(x.float(), block=4096).double()
    assert (ours >= 0).all()
    assert torch.allclose(ours, exact, rtol=1e-3, atol=0)
    naive = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
    assert not torch.allclose(naive.double(), exact, rtol=1e-3, atol=0)


def test_multi_krum_selects_the_exact_float64_set() -> None:
    g = torch.Generator().manual_seed(1)
    n, d, f = 20, 100_000, 6
    honest = 50.0 + 0.02 * torch.randn(n - f, d, generator=g)
    byz = (
        50.0 + 0.02 * torch.randn(f, d, generator=g) + 0.01
    )  # a small, shifted cluster
    x = torch.cat([honest, byz]).float()
    result = multi_krum(x, f=f)
    assert result.selected is not None
    chosen = set(result.selected.nonzero().squeeze(1).tolist())
    assert chosen == exact_multi_krum_selection(x, f)
    assert chosen == set(range(n - f))
    assert torch.allclose(
        result.aggregate.double(), x[: n - f].double().mean(0), atol=1e-4
    )


def test_multi_krum_rejects_outliers_and_weights() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 50, generator=g)
    x[7:] *= 100
    r = multi_krum(x, f=3)
    assert r.selected is not None and r.selected[:7].all() and not r.selected[7:].any()
    w = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    weighted = multi_krum(x, f=3, weights=w)
    assert torch.allclose(weighted.aggregate, x[0])
    with pytest.raises(ValueError, match="n > f \\+ 2"):
        multi_krum(x[:5], f=3)


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 16), st.integers(0, 2**31 - 1))
def test_permutation_invariance(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 33, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    f = (n - 3) // 2
    a, b = multi_krum(x, f=f), multi_krum(x[perm], f=f)
    assert torch.allclose(a.aggregate, b.aggregate)
    assert torch.allclose(
        coordinate_median(x).aggregate, coordinate_median(x[perm]).aggregate
    )
    assert torch.allclose(
        trimmed_mean(x, f=f // 2).aggregate, trimmed_mean(x[perm], f=f // 2).aggregate
    )
    assert torch.allclose(
        geometric_median(x).aggregate, geometric_median(x[perm]).aggregate, atol=1e-5
    )


def test_coordinatewise_rules_against_numpy_style_references() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 70_000, generator=g, dtype=torch.float64)
    assert torch.allclose(coordinate_median(x).aggregate, x.median(dim=0).values)
    s = x.sort(dim=0).values
    assert torch.allclose(trimmed_mean(x, f=2).aggregate, s[2:7].mean(0))
    with pytest.raises(ValueError, match="cannot drop"):
        trimmed_mean(x, f=5)


def test_geometric_median_resists_a_far_minority() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 20, generator=g, dtype=torch.float64)
    x[:3] += 1000.0
    gm = geometric_median(x).aggregate
    assert torch.linalg.vector_norm(gm - x[3:].mean(0)) < 5.0
    mean_shift = torch.linalg.vector_norm(x.mean(0) - x[3:].mean(0))
    assert mean_shift > 100.0


def test_registry() -> None:
    assert {
        "fedavg",
        "geometric_median",
        "krum",
        "median",
        "multikrum",
        "trimmed_mean",
    } <= set(available_aggregators())
    agg = get_aggregator("multikrum", byzantine_fraction=0.3)
    assert agg.f_for(10) == 3 and agg.min_clients(3) == 9
    with pytest.raises(ValueError, match=r"aggregator must be one of .*; got 'bogus'"):
        get_aggregator("bogus")
    with pytest.raises(ValueError, match="already registered"):

        @register_aggregator
        class Dup(Aggregator):
            name = "median"

            def _aggregate(self, updates, f, weights):  # type: ignore[no-untyped-def]
                raise NotImplementedError

    with pytest.raises(ValueError, match="byzantine_fraction"):
        get_aggregator("median", byzantine_fraction=0.5)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="shape"):
        pairwise_sq_distances(torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        pairwise_sq_distances(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        pairwise_sq_distances([[1.0]])  # type: ignore[arg-type]


def test_shares_are_decimal_products() -> None:
    """0.29 of 100 clients tolerates 29 (binary floats would floor 28.999... to
    28); the chart does the same arithmetic, so both accept the same settings."""
    from fractions import Fraction

    from protogalaxy.defense.robust import get_aggregator, share_of

    assert share_of(0.29, 100) == 29
    assert share_of(0.1, 5) == Fraction(1, 2) and round(share_of(0.1, 5)) == 0
    assert round(share_of(0.3, 5)) == 2 and round(share_of(0.25, 10)) == 2
    assert get_aggregator("multikrum", byzantine_fraction=0.29).f_for(100) == 29
    assert get_aggregator("multikrum", byzantine_fraction=0.14).f_for(75) == 10


def test_geometric_median_converges_to_the_float64_minimizer() -> None:
    # Weiszfeld on the weights (Gram form) must land on the same point as plain
    # float64 Weiszfeld over the rows, within 1e-6 of the data's scale, and say
    # how many iterations it took.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3000, generator=g) + 5.0  # a large common component
    x[:8] += 50 * torch.randn(8, 3000, generator=g)
    ref = x.double().mean(0)
    for _ in range(5000):
        w = 1 / (x.double() - ref).norm(dim=1).clamp(min=1e-12)
        ref = (w[:, None] * x.double()).sum(0) / w.sum()
    got = geometric_median(x)
    scale = float(x.double().norm(dim=1).median())
    assert got.iterations is not None and 1 < got.iterations < 1000
    assert float((got.aggregate.double() - ref).norm()) <= 1e-6 * scale
    assert max(got.weights or ()) == (1 << 29) - 1


def test_median_and_trimmed_mean_match_float64_references() -> None:
    g = torch.Generator().manual_seed(6)
    for n in (9, 10):
        x = torch.randn(n, 20_000, generator=g)
        # ties and signed zeros
        x[0, :7] = torch.tensor([0.0, -0.0, 1.0, 3.0, 2.0, 2.0, 2.0])
        srt = x.double().sort(dim=0).values
        med = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
        assert torch.equal(coordinate_median(x).aggregate, med.float())
        k = 2
        tm = srt[k : n - k].mean(0)
        got = trimmed_mean(x, f=k).aggregate.double()
        assert float((got - tm).abs().max()) <= 1e-6 * float(x.abs().max())


def test_bulyan_selects_by_repeated_krum_then_trims() -> None:
    from protogalaxy.defense.robust import bulyan

    g = torch.Generator().manual_seed(1)
    honest = torch.randn(12, 50, generator=g) * 0.1 + 1.0
    x = torch.cat([honest, torch.full((3, 50), 50.0)])
    r = bulyan(x, f=3)
    assert r.selected is not None and int(r.selected.sum()) == 15 - 6
    # identical colluders can win the last Krum steps (their scores reach 0 once
    # few rows are left); the trimmed mean then drops them coordinate by coordinate
    assert float((r.aggregate - 1.0).abs().max()) < 0.5
    kept = x[r.selected].sort(dim=0).values[3:-3].double().mean(0).float()
    assert torch.allclose(r.aggregate, kept, atol=1e-6)
    with pytest.raises(ValueError, match="4f \\+ 3"):
        bulyan(x[:14], f=3)


def test_centered_clipping_bounds_what_outliers_can_move() -> None:
    from protogalaxy.defense.robust import centered_clipping

    g = torch.Generator().manual_seed(2)
    honest = torch.randn(7, 200, generator=g) * 0.1 + 1.0
    moved = []
    for size in (10.0, 1e3, 1e6):
        x = torch.cat([honest, torch.full((3, 200), size)])
        r = centered_clipping(x, f=3)
        moved.append(float((r.aggregate - honest.mean(0)).norm()))
        again = centered_clipping(x, f=3)
        assert torch.equal(r.aggregate, again.aggregate)  # reproducible
        assert r.weights is not None
    # however far the attackers go, the aggregate moves a bounded amount
    assert max(moved) < 2.0 * min(moved) + 1.0
    assert moved[-1] < 5.0

"""Attacks: each does what its paper says."""

from __future__ import annotations

import pytest
import torch

from protogalaxy.learning.attacks import (
    AttackConfig,
    add_trigger,
    alie_z,
    data_transform,
    is_active,
    poison_updates,
)


def updates() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randn(10, 50, generator=g)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[7:] = True
    return x, mask


def test_alie_z_matches_the_paper() -> None:
    # n = 10, f = 3: s = floor(10/2 + 1) - 3 = 3, z = Phi^-1(7/10) = 0.5244
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-3)


@pytest.mark.parametrize("name", ["sign_flip", "scaling", "gaussian", "alie", "ipm"])
def test_model_attacks_touch_only_byzantine_rows(name: str) -> None:
    x, mask = updates()
    out = poison_updates(AttackConfig(name=name), x, mask, generator=torch.Generator())
    assert torch.equal(out[:7], x[:7])
    assert not torch.equal(out[7:], x[7:])
    benign = x[:7]
    if name == "sign_flip":
        assert torch.allclose(out[7:], -4 * x[7:])
    elif name == "scaling":
        assert torch.allclose(out[7:], 10 * x[7:])
    elif name == "alie":
        expected = benign.mean(0) - alie_z(10, 3) * benign.std(0)
        assert torch.allclose(out[7], expected)
    elif name == "ipm":
        assert torch.allclose(out[8], -0.5 * benign.mean(0))


def test_data_attacks() -> None:
    x = torch.zeros(8, 1, 28, 28)
    y = torch.arange(8)
    flip = data_transform(AttackConfig(name="label_flip"))
    assert flip(x, y)[1].tolist() == [9 - i for i in range(8)]
    bd = data_transform(
        AttackConfig(name="backdoor", backdoor_target=3, backdoor_fraction=0.5)
    )
    xb, yb = bd(x, y)
    assert yb.tolist() == [3, 3, 3, 3, 4, 5, 6, 7]
    assert xb[:4, 0, -5:-1, -5:-1].eq(0).all()  # brightest value of an all-zero batch
    # Stacked (clients, batch, ...): each client's first half is triggered.
    xs = torch.rand(3, 8, 1, 28, 28)
    ys = torch.arange(8).repeat(3, 1)
    xt, yt = bd(xs, ys)
    assert (yt[:, :4] == 3).all() and torch.equal(yt[:, 4:], ys[:, 4:])
    assert (
        xt[:, :4, 0, -5:-1, -5:-1] == xs[:, :4].max()
    ).all()  # of the triggered slice
    assert torch.equal(xt[:, 4:], xs[:, 4:])
    assert torch.equal(flip(xs, ys)[1], 9 - ys)
    lit = add_trigger(torch.rand(2, 1, 28, 28))
    assert lit[:, 0, -5:-1, -5:-1].min() == lit.max()
    assert data_transform(AttackConfig(name="ipm")) is None


def test_intermittent_attacks_are_seeded() -> None:
    cfg = AttackConfig(name="sign_flip", rounds_fraction=0.5)
    active = [is_active(cfg, r, seed=1) for r in range(200)]
    assert 60 < sum(active) < 140
    assert active == [is_active(cfg, r, seed=1) for r in range(200)]
    assert not is_active(AttackConfig(name="none"), 0, seed=0)
    with pytest.raises(ValueError, match="attack must be one of"):
        AttackConfig(name="meteor")


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_min_max_and_min_sum_stay_just_inside_the_benign_spread(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 300, generator=g) * 0.1 + 0.5
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    out = poison_updates(AttackConfig(name=name), x, mask, generator=g)
    benign = x[3:].double()
    evil = out[0].double()
    assert torch.equal(out[0], out[1]) and torch.equal(out[3:], x[3:])
    d = torch.cdist(benign, benign).pow(2)
    far = (benign - evil).pow(2).sum(1)
    if name == "min_max":
        bound, got = float(d.max()), float(far.max())
    else:
        bound, got = float(d.sum(1).max()), float(far.sum())
    assert got <= bound * (1 + 1e-6)
    assert got >= 0.95 * bound  # as far as it may go, not merely inside
    assert float((evil - benign.mean(0)).norm()) > 0  # it does move


def test_targeted_flip_relabels_only_its_source_class() -> None:
    flip = data_transform(AttackConfig(name="targeted_flip"))
    assert flip is not None
    _, y = flip(torch.zeros(5, 1, 2, 2), torch.tensor([3, 7, 1, 3, 9]))
    assert y.tolist() == [7, 7, 1, 7, 9]


def test_a_data_attack_that_makes_impossible_labels_is_named() -> None:
    from protogalaxy.learning.attacks import data_attack

    @data_attack("labels_out_of_range_for_tests")
    def bad(x: torch.Tensor, y: torch.Tensor, config: AttackConfig):  # type: ignore[no-untyped-def]
        return x, y + 100

    fn = data_transform(AttackConfig(name="labels_out_of_range_for_tests"))
    assert fn is not None
    with pytest.raises(ValueError, match="'labels_out_of_range_for_tests' made labels"):
        fn(torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))


def _galaxy(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten updates around a shared direction, the last three Byzantine, and
    layer 2's direction reference (that shared direction)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(400, generator=g)
    x = base + 0.8 * torch.randn(10, 400, generator=g)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[7:] = True
    return x, mask, base


def _verdicts(
    cfg: object, x: torch.Tensor, reference: torch.Tensor
) -> list[tuple[bool, bool]]:
    """(flagged, selected) per attacker row, from a real galaxy defense."""
    from protogalaxy.defense.pipeline import GalaxyDefense

    report = GalaxyDefense(0, cfg).run(  # type: ignore[arg-type]
        round=0, clients=list(range(10)), updates=x, reference_direction=reference
    )
    return [
        (report.outcomes[i].flagged, report.outcomes[i].selected) for i in (7, 8, 9)
    ]


def _inside(cfg: object, x: torch.Tensor, reference: torch.Tensor) -> bool:
    """No attacker row flagged, and at least one aggregated."""
    verdicts = _verdicts(cfg, x, reference)
    return not any(f for f, _ in verdicts) and any(s for _, s in verdicts)


@pytest.mark.parametrize("perturbation", ["std", "sign"])
def test_adaptive_stays_just_inside_layers_2_and_3(perturbation: str) -> None:
    from protogalaxy.defense.pipeline import DefenseConfig, GalaxyDefense
    from protogalaxy.learning.attacks import ModelAttackContext, adaptive_rows

    x, mask, ref = _galaxy()
    cfg = DefenseConfig()
    attack = AttackConfig(name="adaptive", params={"perturbation": perturbation})
    out = poison_updates(
        attack, x, mask, generator=torch.Generator(), defense=cfg, reference=ref
    )
    assert torch.equal(out[:7], x[:7]) and torch.equal(out[7], out[9])
    # the galaxy's own defense flags none of it and aggregates it ...
    assert _inside(cfg, out, ref)
    ctx = ModelAttackContext(x, mask, attack, torch.Generator(), cfg, ref)
    tau, scale, rows = adaptive_rows(ctx, perturbation)
    assert torch.equal(rows, out[7:]) and tau > 0.2 and scale < 64  # it turns away
    # ... it pulls the galaxy's aggregate away from the honest direction ...
    mu = x[:7].mean(0)

    def pull(updates: torch.Tensor) -> float:
        report = GalaxyDefense(0, cfg).run(
            round=0, clients=list(range(10)), updates=updates,
            reference_direction=ref,
        )  # fmt: skip
        assert report.aggregate is not None
        return float(report.aggregate @ mu / mu.norm() ** 2)

    assert pull(out) < pull(x)
    # ... and a little longer the defense would catch it: at the edge, not inside
    longer = x.clone()
    longer[7:] = out[7:] * 1.05
    assert not _inside(cfg, longer, ref)


def test_adaptive_tunes_itself_to_the_defense_it_faces() -> None:
    from protogalaxy.defense.pipeline import DefenseConfig
    from protogalaxy.defense.statistical import StatisticsConfig
    from protogalaxy.learning.attacks import ModelAttackContext, adaptive_rows

    x, mask, ref = _galaxy()
    attack = AttackConfig(name="adaptive")

    def search(cfg: DefenseConfig) -> tuple[float, float, torch.Tensor]:
        return adaptive_rows(
            ModelAttackContext(x, mask, attack, torch.Generator(), cfg, ref)
        )

    loose = DefenseConfig()
    tight = DefenseConfig(statistics=StatisticsConfig(norm_k=1.0, min_failures=1))
    tau_loose, _, _ = search(loose)
    tau_tight, _, rows = search(tight)
    assert tau_tight < tau_loose
    out = x.clone()
    out[7:] = rows
    assert _inside(tight, out, ref)
    # FLTrust: replayed with the benign mean for the server's update; Krum
    # selects one row, which is enough
    for rule in ("fltrust", "krum"):
        assert search(DefenseConfig(aggregator=rule))[0] > 0.2, rule


def test_adaptive_rejects_an_unknown_perturbation() -> None:
    from protogalaxy.config import ConfigError, load_config

    with pytest.raises(ValueError, match="perturbation must be one of"):
        AttackConfig(name="adaptive", params={"perturbation": "sideways"})
    # refused when the configuration is read, before any run starts
    with pytest.raises(ConfigError, match="perturbation must be one of std, sign"):
        load_config(
            overrides={
                "byzantine.attack": "adaptive",
                "byzantine.params": {"perturbation": "unit"},
            }
        )

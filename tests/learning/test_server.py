"""The global aggregator's step: FedAvgM, FedAdam and FedYogi against the formulas
of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021, Algorithm 2),
written out here in float64 numpy, one coordinate at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protogalaxy.config import ConfigError, load_config
from protogalaxy.learning.server import ServerStep, server_step


def reference(
    kind: str, updates: list[np.ndarray], lr: float, b1: float, b2: float, tau: float
) -> np.ndarray:
    x = np.zeros_like(updates[0])
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for g in updates:
        for i in range(len(x)):
            if kind == "fedavgm":
                m[i] = b1 * m[i] + g[i]
                x[i] = x[i] + lr * m[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            if kind == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            else:
                d = v[i] - g[i] ** 2
                v[i] = v[i] - (1 - b2) * g[i] ** 2 * (
                    0 if d == 0 else math.copysign(1, d)
                )
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_each_step_follows_the_published_update(kind: str) -> None:
    rng = np.random.default_rng(0)
    # updates whose scale changes from round to round, some coordinates at zero
    updates = [rng.normal(size=50) * s for s in (1e-3, 1e-1, 1.0, 1e-2, 5e-4)]
    updates[2][:5] = 0.0
    step = ServerStep(kind, lr=0.05, momentum=0.8, beta2=0.95, tau=1e-3)
    x = torch.zeros(50, dtype=torch.float64)
    m = torch.zeros_like(x)
    v = step.initial_second_moment(x)
    for g in updates:
        x, m, v = step.step(x, torch.from_numpy(g), m, v)
    want = reference(kind, updates, 0.05, 0.8, 0.95, 1e-3)
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-12, atol=1e-15)


def test_adaptive_steps_are_about_lr_per_coordinate_whatever_the_scale() -> None:
    """Why FedAdam's and FedYogi's lr is far below FedAvgM's: the first
    step moves every coordinate by about lr (1 - b1) / sqrt(1 - b2), for an
    update of 1e-4 as for one of 10."""
    for kind in ("fedadam", "fedyogi"):
        step = ServerStep(kind, lr=0.01, momentum=0.9, beta2=0.99, tau=1e-9)
        for scale in (1e-4, 10.0):
            x = torch.zeros(4, dtype=torch.float64)
            g = torch.full((4,), scale, dtype=torch.float64)
            x, _, _ = step.step(
                x, g, torch.zeros_like(x), step.initial_second_moment(x)
            )
            np.testing.assert_allclose(
                x.numpy(), 0.01 * 0.1 / math.sqrt(0.01), rtol=1e-3
            )


def test_the_configuration_names_the_step() -> None:
    default = server_step(load_config().training)
    assert (default.kind, default.lr, default.momentum) == ("fedavgm", 1.3, 0.5)
    adam = server_step(
        load_config(overrides={"training.server_optimizer": "fedadam"}).training
    )
    assert (adam.kind, adam.lr, adam.momentum, adam.beta2) == (
        "fedadam",
        0.03,
        0.9,
        0.99,
    )
    mine = server_step(
        load_config(
            overrides={
                "training.server_optimizer": "fedyogi",
                "training.server_lr": 0.1,
                "training.server_momentum": 0.0,
            }
        ).training
    )
    assert (mine.kind, mine.lr, mine.momentum) == ("fedyogi", 0.1, 0.0)
    for bad in (
        {"training.server_optimizer": "adam"},
        {"training.server_lr": 0},
        {"training.server_beta2": 1.0},
        {"training.server_tau": 0},
    ):
        with pytest.raises(ConfigError):
            load_config(overrides=bad)


def test_adaptive_steps_need_layer_5() -> None:
    """One unclipped aggregate of 1e3 inflates FedAdam's second moment and
    freezes the model for hundreds of rounds (a review found it): refused."""
    with pytest.raises(ConfigError, match="needs defense layer 5"):
        load_config(
            overrides={
                "training.server_optimizer": "fedadam",
                "defense.layers": [1, 2, 3, 4],
            }
        )
    load_config(overrides={"defense.layers": [1, 2, 3, 4]})  # FedAvgM: fine

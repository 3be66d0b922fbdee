"""Local learning-rate schedules: the rate by round, and that training uses it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from protogalaxy.config import ConfigError, load_config
from protogalaxy.learning.training import (
    BatchedTrainer,
    ClientTask,
    local_lr,
    round_lr,
)


def test_the_rate_by_round() -> None:
    assert [local_lr(0.1, r, schedule="constant", rounds=5) for r in range(5)] == [
        0.1
    ] * 5
    cos = [local_lr(0.1, r, schedule="cosine", rounds=5, lr_min=0.01) for r in range(7)]
    assert cos[0] == pytest.approx(0.1)
    assert cos[2] == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * 2 / 5)) / 2)
    assert all(a > b for a, b in itertools.pairwise(cos[:5]))
    assert cos[4] > 0.01  # the last round stays above the floor ...
    assert cos[5] == cos[6] == cos[4]  # ... and so do rounds past it
    # with the default floor of 0, the last round still trains (it crashed)
    assert local_lr(0.1, 4, schedule="cosine", rounds=5) > 0
    step = [
        local_lr(0.1, r, schedule="step", rounds=50, step_rounds=2, gamma=0.5)
        for r in range(6)
    ]
    assert step == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    floor = local_lr(0.1, 40, schedule="step", rounds=50, lr_min=0.02, step_rounds=2)
    assert floor == 0.02
    assert local_lr(0.1, 3, schedule="cosine", rounds=1) == 0.1
    assert local_lr(0.1, 0, schedule="cosine", rounds=1) == 0.1
    with pytest.raises(ValueError, match="schedule"):
        local_lr(0.1, 0, schedule="linear", rounds=5)


def test_the_configuration_sets_the_schedule() -> None:
    cfg = load_config(
        overrides={
            "training.lr": 0.05,
            "training.lr_schedule": "cosine",
            "training.lr_min": 0.005,
            "training.rounds": 3,
        }
    )
    got = [round_lr(cfg.training, r) for r in range(3)]
    assert got == pytest.approx([0.05, 0.03875, 0.01625])
    assert round_lr(load_config().training, 7) == 0.01
    with pytest.raises(ConfigError, match="lr_min"):
        load_config(overrides={"training.lr_schedule": "step", "training.lr_min": 0.5})


def test_training_takes_the_rounds_rate() -> None:
    """Training at a round's rate is exactly training with a trainer built with
    that rate: the schedule reaches the step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(48, 1, 4, 4)
    y = torch.randint(0, 3, (48,))
    tasks = [ClientTask(torch.arange(0, 24)), ClientTask(torch.arange(24, 48))]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def run(trainer: BatchedTrainer, lr: float | None) -> torch.Tensor:
        return trainer.train(
            params, tasks, x, y, generator=torch.Generator().manual_seed(3), lr=lr
        )

    base = BatchedTrainer(model, lr=0.1, momentum=0.9, batch_size=8)
    other = BatchedTrainer(model, lr=0.02, momentum=0.9, batch_size=8)
    assert torch.equal(run(base, 0.02), run(other, None))
    assert not torch.allclose(run(base, None), run(base, 0.02))
    with pytest.raises(ValueError, match="lr"):
        run(base, 0.0)

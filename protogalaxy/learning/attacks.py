"""Byzantine attacks.

Data poisoning (applied to a Byzantine client's batches during local training):

* ``label_flip``: ``y -> (C - 1) - y`` (``9 - y`` for ten classes).
* ``backdoor``: a 4x4 bright patch in the bottom-right corner, relabelled to
  ``backdoor_target``, on a fraction of each batch (Bagdasaryan et al. 2020 style);
  success is measured as the attack success rate on triggered test images.

Model poisoning (applied to the trained update before it is committed):

* ``sign_flip``: ``-k u`` (``k = sign_flip_scale``, 4 by default: with ``k = 1`` a
  30% minority only slows plain averaging down); ``scaling``: ``lambda * u``;
  ``gaussian``: ``N(0, sigma^2)``.
* ``alie``, "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019):
  ``mean - z * std`` of the benign updates, coordinate-wise, with
  ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``.
* ``ipm``, inner product manipulation (Xie, Koyejo, Gupta, UAI 2019):
  ``-epsilon * mean`` of the benign updates.

ALIE and IPM are omniscient: they use the benign updates of the attacker's galaxy.
An attack may be intermittent: active in a seeded fraction of rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ATTACKS",
    "AttackConfig",
    "add_trigger",
    "alie_z",
    "data_transform",
    "is_active",
    "poison_updates",
    "train_clients",
]

DATA_ATTACKS = ("label_flip", "backdoor")
MODEL_ATTACKS = ("sign_flip", "scaling", "gaussian", "alie", "ipm")
ATTACKS = ("none", *DATA_ATTACKS, *MODEL_ATTACKS)


@dataclass(frozen=True)
class AttackConfig:
    name: str = "label_flip"
    num_classes: int = 10
    scale: float = 10.0
    sign_flip_scale: float = 4.0
    noise_std: float = 0.1
    ipm_epsilon: float = 0.5
    alie_z: float | None = None
    backdoor_target: int = 0
    backdoor_fraction: float = 0.5
    rounds_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(
                f"attack must be one of {', '.join(ATTACKS)}; got {self.name!r}"
            )
        if not 0.0 < self.rounds_fraction <= 1.0:
            raise ValueError(
                f"rounds_fraction must be in (0, 1], got {self.rounds_fraction}"
            )
        if not 0.0 < self.backdoor_fraction <= 1.0:
            raise ValueError("backdoor_fraction must be in (0, 1]")


def is_active(config: AttackConfig, round: int, seed: int) -> bool:
    """Whether the (possibly intermittent) attack runs in ``round``; seeded."""
    if config.name == "none":
        return False
    if config.rounds_fraction >= 1.0:
        return True
    g = torch.Generator().manual_seed(seed * 1_000_003 + round)
    return bool(torch.rand((), generator=g) < config.rounds_fraction)


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """Stamp the backdoor trigger on ``x`` (images ``(..., H, W)``): a 4x4 patch one
    pixel in from the bottom-right corner, set to the brightest value in ``x``."""
    out = x.clone()
    out[..., -5:-1, -5:-1] = x.max()
    return out


def data_transform(config: AttackConfig):  # type: ignore[no-untyped-def]
    """The batch transform of a data-poisoning attack, or None."""
    if config.name == "label_flip":
        c = config.num_classes

        def flip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, (c - 1) - y

        return flip
    if config.name == "backdoor":
        target = config.backdoor_target
        fraction = config.backdoor_fraction

        def backdoor(
            x: torch.Tensor, y: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # the first k samples of each client's batch (batch is the last dim of y)
            k = max(1, round(fraction * y.shape[-1]))
            x = x.clone()
            y = y.clone()
            x[..., :k, :, :, :] = add_trigger(x[..., :k, :, :, :])
            y[..., :k] = target
            return x, y

        return backdoor
    return None


def alie_z(n: int, f: int) -> float:
    """The ALIE ``z_max`` for ``n`` clients of which ``f`` are Byzantine."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    # Phi^-1(p) = sqrt(2) erfinv(2p - 1)
    return float(math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * p - 1.0)))


def poison_updates(
    config: AttackConfig,
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Replace the rows ``byzantine`` (bool mask) of one galaxy's ``updates``."""
    name = config.name
    if name not in MODEL_ATTACKS or not bool(byzantine.any()):
        return updates
    out = updates.clone()
    benign = updates[~byzantine] if bool((~byzantine).any()) else updates
    rows = byzantine.nonzero().squeeze(1)
    if name == "sign_flip":
        out[rows] = -config.sign_flip_scale * updates[rows]
    elif name == "scaling":
        out[rows] = config.scale * updates[rows]
    elif name == "gaussian":
        noise = torch.randn(len(rows), updates.shape[1], generator=generator)
        out[rows] = config.noise_std * noise.to(updates.dtype)
    elif name == "alie":
        n, f = len(updates), len(rows)
        z = config.alie_z if config.alie_z is not None else alie_z(n, f)
        out[rows] = benign.mean(0) - z * benign.std(0)
    elif name == "ipm":
        out[rows] = -config.ipm_epsilon * benign.mean(0)
    return out


def train_clients(
    trainer: Any,
    params: dict[str, torch.Tensor],
    clients: list[int],
    *,
    parts: Mapping[int, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    byzantine: set[int],
    galaxy_of: Callable[[int], int],
    round: int,
    seed: int,
    generator: torch.Generator,
    lr: float | None = None,
) -> torch.Tensor:
    """One round of local training for ``clients``, honest and Byzantine alike,
    at learning rate ``lr`` (the trainer's own when None).

    Data poisoning runs inside training; model poisoning replaces the Byzantine rows
    afterwards, galaxy by galaxy (ALIE and IPM see their own galaxy's benign updates).
    ``trainer`` is a :class:`~protogalaxy.learning.training.BatchedTrainer`. The
    simulation and the client runner both call this, so they train alike.
    """
    from protogalaxy.learning.training import ClientTask

    active = is_active(attack, round, seed)
    transform = data_transform(attack) if active else None
    tasks = [
        ClientTask(parts[c], transform if c in byzantine else None) for c in clients
    ]
    updates: torch.Tensor = trainer.train(
        params, tasks, x, y, generator=generator, lr=lr
    ).cpu()
    if active:
        for g in sorted({galaxy_of(c) for c in clients}):
            rows = [i for i, c in enumerate(clients) if galaxy_of(c) == g]
            mask = torch.tensor([clients[i] in byzantine for i in rows])
            updates[rows] = poison_updates(
                attack, updates[rows], mask, generator=generator
            )
    return updates

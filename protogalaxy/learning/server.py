"""The global aggregator's step: how the combined update moves the global model.

* ``fedavgm``: server momentum (Hsu et al. 2019): ``v = mu v + g``,
  ``x = x + lr v``; ``mu = 0`` is plain FedAvg with a server step size.
* ``fedadam`` and ``fedyogi``: adaptive server optimizers (Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021, Algorithm 2): ``m = b1 m + (1 - b1) g``;
  Adam: ``v = b2 v + (1 - b2) g^2``; Yogi: ``v = v - (1 - b2) g^2 sign(v - g^2)``;
  ``x = x + lr m / (sqrt(v) + tau)``, with ``v`` starting at ``tau^2``. The step
  of each coordinate is then about ``lr`` whatever the update's scale, which is why
  their ``lr`` is far below FedAvgM's (0.03 against 1.3 by default).

``g`` is the round's combined update (the defense's output, already clipped by
layer 5). A step is computed without changing anything, so a step that would make
the model non-finite is dropped whole (see ``GlobalAggregator.finish_round``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import torch

if TYPE_CHECKING:
    from protogalaxy.config import TrainingSection

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MOMENTUM",
    "SERVER_OPTIMIZERS",
    "ServerStep",
    "server_step",
]

SERVER_OPTIMIZERS: Final = ("fedavgm", "fedadam", "fedyogi")

#: the server step size when the configuration names none
DEFAULT_LR: Final = {"fedavgm": 1.3, "fedadam": 0.03, "fedyogi": 0.03}
#: FedAvgM's momentum, FedAdam's and FedYogi's b1, when the configuration names none
DEFAULT_MOMENTUM: Final = {"fedavgm": 0.5, "fedadam": 0.9, "fedyogi": 0.9}


@dataclass(frozen=True)
class ServerStep:
    """One optimizer's settings; :meth:`step` is a pure function of its inputs."""

    kind: str = "fedavgm"
    lr: float = 1.0
    #: FedAvgM's momentum; the first-moment decay ``b1`` of FedAdam and FedYogi
    momentum: float = 0.0
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server optimizer {self.kind!r}: one of {list(SERVER_OPTIMIZERS)}"
            )
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError("need server lr > 0 and 0 <= server momentum < 1")
        if not 0 <= self.beta2 < 1 or not self.tau > 0:
            raise ValueError("need 0 <= beta2 < 1 and tau > 0")

    @property
    def adaptive(self) -> bool:
        return self.kind != "fedavgm"

    def initial_second_moment(self, params: torch.Tensor) -> torch.Tensor:
        """``v`` before the first round: ``tau^2`` (Reddi et al.); unused by
        FedAvgM (an empty tensor)."""
        if not self.adaptive:
            return params.new_zeros(0)
        return torch.full_like(params, self.tau**2)

    def step(
        self,
        params: torch.Tensor,
        update: torch.Tensor,
        velocity: torch.Tensor,
        second_moment: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new ``(params, velocity, second_moment)`` after ``update``."""
        g = update.to(params.dtype)
        if not self.adaptive:
            v = self.momentum * velocity + g
            return params + self.lr * v, v, second_moment
        m = self.momentum * velocity + (1 - self.momentum) * g
        g2 = g * g
        if self.kind == "fedadam":
            s = self.beta2 * second_moment + (1 - self.beta2) * g2
        else:
            s = second_moment - (1 - self.beta2) * g2 * torch.sign(second_moment - g2)
        return params + self.lr * m / (s.sqrt() + self.tau), m, s


def server_step(training: TrainingSection) -> ServerStep:
    """The step a configuration's ``training`` section names, with each
    optimizer's defaults for what it leaves out."""
    kind = training.server_optimizer
    return ServerStep(
        kind,
        DEFAULT_LR[kind] if training.server_lr is None else training.server_lr,
        DEFAULT_MOMENTUM[kind]
        if training.server_momentum is None
        else training.server_momentum,
        training.server_beta2,
        training.server_tau,
    )

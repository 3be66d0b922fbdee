"""Your own model and your own data through the whole pipeline.

A 3-class MLP on tensors made here (any torch tensors will do), registered by
name so that a YAML configuration can name them too; the number of classes comes
from the data, for the model and for the attacks. Run:
python examples/own_model_and_data.py
"""

from __future__ import annotations

import torch
from torch import nn

from protogalaxy.config import load_config
from protogalaxy.learning.datasets import Dataset, register_dataset
from protogalaxy.learning.models import register_model
from protogalaxy.simulation import Simulation


class MLP(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(start_dim=-3), nn.Linear(64, 32), nn.ReLU(),
            nn.Linear(32, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bands(root: object = None, n: int = 1200) -> Dataset:
    """8x8 images whose class (0, 1 or 2) is a bright band at one of three rows."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(3):
        x[y == c, :, 1 + 2 * c, :] += 1.0
    cut = n * 5 // 6
    return Dataset("bands", x[:cut], y[:cut], x[cut:], y[cut:], num_classes=3)


register_model("mlp3", MLP)
register_dataset("bands", bands)

if __name__ == "__main__":
    config = load_config(
        overrides={
            "model": "mlp3",
            "dataset.name": "bands",
            "clients.count": 10,
            "galaxies.count": 2,
            "clients.samples_per_client": 80,
            "byzantine.fraction": 0.2,
            "training.rounds": 5,
        }
    )
    result = Simulation(config).run()
    summary = result.summary()
    print(
        f"final accuracy {summary['final_accuracy']:.3f}, "
        f"model {result.config.model} on {result.config.dataset.name}"
    )

"""Your own aggregation rule in layer 3.

``clipped_mean`` clips every update to the median update norm, then averages: a
simple relative of centered clipping (Karimireddy et al. 2021). A subclass of
``Aggregator``, registered by name, so YAML can name it (``defense.aggregator:
clipped_mean``, or ``examples.own_aggregator:ClippedMean`` from another process,
with the repository on PYTHONPATH).
It runs in the galaxies and at the global aggregator, as the built-in rules do.
Run: python examples/own_aggregator.py [--rounds 5]
"""

from __future__ import annotations

import argparse

import torch

from protogalaxy.config import load_config
from protogalaxy.defense.robust import (
    AggregationResult,
    Aggregator,
    mean,
    register_aggregator,
)
from protogalaxy.simulation import Simulation


@register_aggregator
class ClippedMean(Aggregator):
    name = "clipped_mean"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: torch.Tensor | None
    ) -> AggregationResult:
        norms = updates.norm(dim=1, keepdim=True)
        scale = (norms.median() / norms.clamp_min(1e-12)).clamp(max=1.0)
        # the aggregate only: its rows are rescaled, so it is no weighted mean of
        # the updates as sent (what AggregationResult.weights would claim)
        return AggregationResult(mean(updates * scale, weights=weights).aggregate)

    def min_clients(self, f: int) -> int:
        return 2 * f + 1  # a majority of honest updates sets the median norm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    for aggregator in ("fedavg", "clipped_mean"):
        config = load_config(
            overrides={
                "byzantine.attack": "scaling",
                "defense.layers": [1, 3],
                "defense.aggregator": aggregator,
                "training.rounds": args.rounds,
                "clients.samples_per_client": args.samples,
            }
        )
        s = Simulation(config).run().summary()
        print(f"{aggregator} against scaling: accuracy {s['final_accuracy']:.3f}")


if __name__ == "__main__":
    main()

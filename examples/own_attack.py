"""Your own attack against the five layers.

``norm_matched_flip`` sends the honest clients' mean direction reversed, scaled to
a typical honest norm: small enough to pass a norm check, pointed the wrong way.
Registered by name, so YAML can name it too (``byzantine.attack:
norm_matched_flip``, or ``examples.own_attack:norm_matched_flip`` from another
process, with the repository on PYTHONPATH: ``PYTHONPATH=. protogalaxy simulate
--config ...``); its settings come from ``byzantine.params``. Run:
python examples/own_attack.py [--rounds 10]
"""

from __future__ import annotations

import argparse

import torch

from protogalaxy.config import load_config
from protogalaxy.learning.attacks import ModelAttackContext, model_attack
from protogalaxy.simulation import Simulation


@model_attack("norm_matched_flip")
def norm_matched_flip(ctx: ModelAttackContext) -> torch.Tensor:
    mean = ctx.benign.mean(0)
    norm = ctx.benign.norm(dim=1).median() * float(ctx.config.params.get("gain", 1.0))
    row = -mean / mean.norm().clamp_min(1e-12) * norm
    return row.expand(len(ctx.rows), -1)  # one row per Byzantine client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    for name, layers, aggregator in (
        ("FedAvg", [1], "fedavg"),
        ("ProtoGalaxy-Full", [1, 2, 3, 4, 5], "multikrum"),
    ):
        config = load_config(
            overrides={
                "byzantine.attack": "norm_matched_flip",
                "byzantine.params": {"gain": 1.0},
                "defense.layers": layers,
                "defense.aggregator": aggregator,
                "training.rounds": args.rounds,
                "clients.samples_per_client": args.samples,
            }
        )
        s = Simulation(config).run().summary()
        print(
            f"{name}: accuracy {s['final_accuracy']:.3f}, "
            f"{s['byzantine_flagged_last_round']} of {len(s['byzantine_clients'])} "
            f"attackers flagged in the last round, "
            f"{len(s['quarantined_clients'])} quarantined"
        )


if __name__ == "__main__":
    main()

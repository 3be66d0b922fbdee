"""Round-cost benchmarks (issue 3), on the default config.

1. One simulated round (vmap training of all clients, commit, trees, receipts,
   reveal, layers 1-5, global step; evaluation excluded) against one epoch of plain
   minibatch SGD of one model over the same samples with the same effective batch
   (clients x batch_size), in the same process (goal: <= 1.25x).
2. The per-round cost of ProtoGalaxy-Full against the same run with the defense off
   (layer 1 and plain FedAvg), same process (goal: <= 1.10x). The time spent in the
   defense itself is reported beside it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import report
from protogalaxy.config import load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.learning.models import build_model
from protogalaxy.simulation import Simulation


def _plain_epoch(sim: Simulation) -> float:
    cfg = sim.config
    model = build_model(cfg.model, seed=cfg.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.training.lr, momentum=cfg.training.momentum
    )
    x, y = sim.data.x_train, sim.data.y_train
    batch = cfg.clients.count * cfg.training.batch_size
    idx = torch.cat(sim.parts)
    idx = idx[torch.randperm(len(idx))]
    steps = cfg.clients.samples_per_client // cfg.training.batch_size
    t0 = time.perf_counter()
    for s in range(steps):
        b = idx[s * batch : (s + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict[str, Any]]:
    print("learning benchmarks (default config)")
    data = load_dataset("mnist")
    rounds = 2 if quick else 4
    full = Simulation(load_config(), dataset=data)
    off = Simulation(
        load_config(overrides={"defense.layers": [1], "defense.aggregator": "fedavg"}),
        dataset=data,
    )
    floor, full_t, off_t, defense_t, fedavg_t = [], [], [], [], []
    for r in range(rounds):  # interleaved, so all three see the same machine state
        floor.append(_plain_epoch(full))
        m, _ = full.run_round(r)
        full_t.append(m.round_seconds)
        defense_t.append(m.aggregation_seconds)
        m, _ = off.run_round(r)
        off_t.append(m.round_seconds)
        fedavg_t.append(m.aggregation_seconds)
    f, s, o = min(floor), min(full_t), min(off_t)
    return [
        report(
            "round vs one plain SGD epoch (same batch)",
            s / f,
            "<= 1.25",
            s / f <= 1.25,
            f"epoch {f:.2f} s, round {s:.2f} s (30 clients x 32 = batch 960)",
        ),
        report(
            "ProtoGalaxy-Full round vs FedAvg round",
            s / o,
            "<= 1.10",
            s / o <= 1.10,
            f"FedAvg {o:.2f} s, Full {s:.2f} s; aggregation "
            f"{min(fedavg_t) * 1e3:.0f} ms vs {min(defense_t) * 1e3:.0f} ms",
        ),
    ]

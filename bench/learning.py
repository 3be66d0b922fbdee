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

import statistics
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
    rounds = 3 if quick else 6
    full = Simulation(load_config(), dataset=data)
    off = Simulation(
        load_config(overrides={"defense.layers": [1], "defense.aggregator": "fedavg"}),
        dataset=data,
    )
    # Each round is measured back to back with its own floor and its FedAvg twin, and
    # the per-round ratios are summarized by their median: this VM's speed drifts by
    # 15-25% over minutes, which a ratio of separately taken minima would absorb.
    vs_floor, vs_off, defense_ms, fedavg_ms = [], [], [], []
    for r in range(rounds):
        floor = _plain_epoch(full)
        m_full, _ = full.run_round(r)
        m_off, _ = off.run_round(r)
        vs_floor.append(m_full.round_seconds / floor)
        vs_off.append(m_full.round_seconds / m_off.round_seconds)
        defense_ms.append(m_full.aggregation_seconds * 1e3)
        fedavg_ms.append(m_off.aggregation_seconds * 1e3)
        print(
            f"  round {r}: plain epoch {floor:.2f} s, "
            f"Full {m_full.round_seconds:.2f} s, FedAvg {m_off.round_seconds:.2f} s"
        )
    a, b = statistics.median(vs_floor), statistics.median(vs_off)
    return [
        report(
            "round vs one plain SGD epoch (same batch)",
            a,
            "<= 1.25",
            a <= 1.25,
            f"median of {rounds} paired rounds (range {min(vs_floor):.2f}-"
            f"{max(vs_floor):.2f}); 30 clients x 32 = batch 960",
        ),
        report(
            "ProtoGalaxy-Full round vs FedAvg round",
            b,
            "<= 1.10",
            b <= 1.10,
            f"median of {rounds} paired rounds "
            f"(range {min(vs_off):.2f}-{max(vs_off):.2f}); "
            f"defense {statistics.median(defense_ms):.0f} ms vs FedAvg "
            f"{statistics.median(fedavg_ms):.1f} ms per round",
        ),
    ]

"""Where the defense loses attackers: a per-round trace of the scenarios issue 16
names (MNIST, 500 samples per client, seed 0 unless given).

    python -m bench.diagnose [--rounds 20] [--seed 0] [--scenario NAME ...]
        [--set defense.reputation.lam_up=null ...] [--seeds N]

For every round: accuracy, layer 2 and layer 3 flags, the Byzantine clients any
layer flagged, the honest clients flagged, the mean (and extreme) reputation of
each group, and the attack's success where it has one; then the round each
attacker first fell below the quarantine threshold. docs/defense.md quotes it.
With ``--seeds N`` it runs seeds ``seed .. seed+N-1`` of each scenario and prints,
instead of the traces, each scenario's mean and standard deviation of accuracy,
detection, false positives and attack success (issue 16's acceptance runs), with
every run's figures as JSON lines to ``--jsonl`` when given.
This is a diagnosis tool, not a benchmark: no goal.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import yaml

from protogalaxy.config import load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.logs import setup_logging
from protogalaxy.simulation import Simulation

DIRICHLET = {"clients.partition": "dirichlet"}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "labelflip-intermittent": {"byzantine.rounds_fraction": 0.5},
    "labelflip-dir0.5": {**DIRICHLET, "clients.dirichlet_alpha": 0.5},
    "alie-iid": {"byzantine.attack": "alie"},
    "alie-dir0.5": {
        "byzantine.attack": "alie",
        **DIRICHLET,
        "clients.dirichlet_alpha": 0.5,
    },
    "backdoor-dir0.3": {
        "byzantine.attack": "backdoor",
        **DIRICHLET,
        "clients.dirichlet_alpha": 0.3,
    },
    "backdoor-dir0.5": {
        "byzantine.attack": "backdoor",
        **DIRICHLET,
        "clients.dirichlet_alpha": 0.5,
    },
    "adaptive-iid": {"byzantine.attack": "adaptive"},
    "adaptive-dir0.5": {
        "byzantine.attack": "adaptive",
        **DIRICHLET,
        "clients.dirichlet_alpha": 0.5,
    },
    "none-dir0.3": {
        "byzantine.attack": "none",
        **DIRICHLET,
        "clients.dirichlet_alpha": 0.3,
    },
}

FIGURES = ("final_accuracy", "detection_rate", "false_positive_rate",
           "attack_success_rate")  # fmt: skip


def summarize_seeds(
    name: str, rounds: int, seeds: range, extra: dict[str, Any], jsonl: str | None
) -> None:
    """Mean and standard deviation of each figure over ``seeds``."""
    import json
    import statistics

    runs = []
    for seed in seeds:
        over = {**SCENARIOS[name], **extra, "seed": seed, "training.rounds": rounds}
        if name != "default":
            over.setdefault("clients.samples_per_client", 500)
        s = Simulation(load_config(overrides=over), dataset=load_dataset("mnist"))
        summary = s.run().summary()
        row = {"scenario": name, "seed": seed, "rounds": rounds, "set": extra}
        row |= {k: summary.get(k) for k in FIGURES}
        runs.append(row)
        if jsonl:
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    cells = []
    for k in FIGURES:
        values = [r[k] for r in runs if r[k] is not None]
        if not values:
            continue
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{k} {statistics.fmean(values):.3f} ± {sd:.3f}")
    print(f"== {name} ({len(runs)} seeds, {rounds} rounds): " + ", ".join(cells),
          flush=True)  # fmt: skip


def trace(name: str, rounds: int, seed: int, extra: dict[str, Any]) -> None:
    over = {**SCENARIOS[name], **extra, "seed": seed, "training.rounds": rounds}
    if name != "default":
        over.setdefault("clients.samples_per_client", 500)
    config = load_config(overrides=over)
    t0 = time.perf_counter()
    result = Simulation(config, dataset=load_dataset("mnist")).run()
    s = result.summary()
    byz = set(result.byzantine)
    print(
        f"== {name}: accuracy {s['final_accuracy']:.3f}, detection "
        f"{s['detection_rate']}, false positives {s['false_positive_rate']:.3f}, "
        f"attack success {s.get('attack_success_rate')} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    for r in result.rounds:
        b = [h[r.round] for c, h in result.reputation_history.items() if c in byz]
        h = [h[r.round] for c, h in result.reputation_history.items() if c not in byz]
        rep_b = f"{sum(b) / len(b):.3f} (max {max(b):.3f})" if b else "-"
        print(
            f"  round {r.round:2d}  accuracy {r.accuracy:.3f}  "
            f"L2 {r.flags_statistics:2d}  L3 {r.flags_robust:2d}  "
            f"Byzantine flagged {r.byzantine_flagged}/"
            f"{len(byz)}  honest flagged {r.flagged - r.byzantine_flagged:2d}  "
            f"reputation Byzantine {rep_b}, honest {sum(h) / len(h):.3f} "
            f"(min {min(h):.3f})"
            + (
                ""
                if r.attack_success_rate is None
                else f"  success {r.attack_success_rate:.2f}"
            )
        )
    below = config.defense.reputation.quarantine_below
    first = [
        next((i for i, v in enumerate(result.reputation_history[c]) if v < below), None)
        for c in result.byzantine
    ]
    print(f"  first round below {below}, per attacker: {first}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.diagnose")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="summaries over this many seeds instead of traces",
    )
    parser.add_argument(
        "--jsonl", default=None, help="with --seeds: append every run's figures here"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=YAML",
        help="a config override, e.g. defense.reputation.lam_up=null",
    )  # fmt: skip
    args = parser.parse_args()
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = yaml.safe_load(value)
    setup_logging("error")
    for name in args.scenario or list(SCENARIOS):
        if args.seeds:
            seeds = range(args.seed, args.seed + args.seeds)
            summarize_seeds(name, args.rounds, seeds, extra, args.jsonl)
        else:
            trace(name, args.rounds, args.seed, extra)


if __name__ == "__main__":
    main()

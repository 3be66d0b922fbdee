"""Scale benchmarks (issue 14): the simulation from 30 to 1,000 clients.

1. Cost per round at 30/3, 100/5, 300/10 and 1000/20 clients/galaxies with the same
   45,000 training samples and the same local work (one epoch each, no step floor),
   each scale in its own process (peak memory is that process's). The round is split
   into phases (see ``Simulation.run_round``). Goal: the 1000-client median round at
   most 1.2x the 30-client one, peak memory under 2 GiB.
2. Time to accuracy on the paper's two scenarios (``configs/paper-scenario-*.yaml``):
   rounds and wall time until test accuracy 0.95, and the defense's figures at the
   end. The goal (under 30 minutes each on a 2-core machine) is reported, not gated.
   Skipped with ``--quick``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import report

ROOT = Path(__file__).resolve().parent.parent
SCALES = [(30, 3), (100, 5), (300, 10), (1000, 20)]
TOTAL_SAMPLES = 45_000
PHASES = [
    "train",
    "commit",
    "trees",
    "receipts",
    "reveal",
    "statistics",
    "robust",
    "reputation",
    "galaxy_other",
    "audit",
]


def _worker_cost(clients: int, galaxies: int, rounds: int) -> dict[str, Any]:
    import resource

    from protogalaxy.config import load_config
    from protogalaxy.simulation import Simulation

    cfg = load_config(
        overrides={
            "clients.count": clients,
            "galaxies.count": galaxies,
            "clients.samples_per_client": TOTAL_SAMPLES // clients,
            "training.rounds": rounds,
            "training.local_epochs": 1,
            "training.min_local_steps": 1,
        }
    )
    sim = Simulation(cfg)
    out = []
    for r in range(rounds):
        m, info = sim.run_round(r)
        out.append({"round": m.round_seconds, "accuracy": m.accuracy, **info["phases"]})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rounds": out, "peak_mib": rss}


def _worker_scenario(path: str, target: float) -> dict[str, Any]:
    import resource

    from protogalaxy.config import load_config
    from protogalaxy.simulation import Simulation

    cfg = load_config(path)
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    reached: dict[str, Any] = {}
    trail = []

    def progress(m: Any) -> None:
        trail.append(round(m.accuracy, 4))
        print(f"    round {m.round}: accuracy {m.accuracy:.4f}", flush=True)
        if not reached and m.accuracy >= target:
            reached.update(round=m.round + 1, seconds=time.perf_counter() - t0)

    result = sim.run(progress)
    s = result.summary()
    return {
        "config": path,
        "rounds_to_target": reached.get("round"),
        "seconds_to_target": reached.get("seconds"),
        "wall_seconds": time.perf_counter() - t0,
        "final_accuracy": s["final_accuracy"],
        "detection_rate": s["detection_rate"],
        "false_positive_rate": s["false_positive_rate"],
        "attack_success_rate": s.get("attack_success_rate"),
        "accuracy_by_round": trail,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _spawn(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)  # type: ignore[no-any-return]


def run(quick: bool = False) -> list[dict[str, Any]]:
    rounds = 2 if quick else 4
    print(f"scale benchmarks: {TOTAL_SAMPLES} samples, one epoch each, {rounds} rounds")
    costs = {}
    for clients, galaxies in SCALES:
        costs[clients] = res = _spawn("cost", str(clients), str(galaxies), str(rounds))
        med = statistics.median(r["round"] for r in res["rounds"])
        split = ", ".join(
            f"{p} {statistics.median(r.get(p, 0.0) for r in res['rounds']):.2f}"
            for p in PHASES
        )
        print(
            f"  {clients:>4} clients / {galaxies:>2} galaxies: median round {med:.2f} s"
            f" ({split}); peak {res['peak_mib']:.0f} MiB"
        )
    base = statistics.median(r["round"] for r in costs[30]["rounds"])
    big = statistics.median(r["round"] for r in costs[1000]["rounds"])
    peak = costs[1000]["peak_mib"]
    results = [
        report(
            "1000/20 round vs 30/3 round (same work)",
            big / base,
            "<= 1.2",
            big / base <= 1.2,
            f"median of {rounds} rounds each: {big:.2f} s vs {base:.2f} s",
        ),
        report(
            "1000/20 peak memory (GiB)",
            peak / 1024,
            "< 2",
            peak < 2048,
            f"{peak:.0f} MiB; 30 clients: {costs[30]['peak_mib']:.0f} MiB",
        ),
    ]
    results.append({"name": "cost by scale", "detail": costs})
    if quick:
        return results
    for name in ("paper-scenario-1", "paper-scenario-2"):
        print(f"  {name}:")
        res = _spawn("scenario", f"configs/{name}.yaml", "0.95")
        secs = res["seconds_to_target"]
        minutes = secs / 60 if secs is not None else float("inf")
        results.append(
            report(
                f"{name}: minutes to accuracy 0.95",
                minutes,
                "< 30",
                minutes < 30,
                f"rounds {res['rounds_to_target']}, final accuracy "
                f"{res['final_accuracy']:.4f}, detection {res['detection_rate']}, "
                f"false positives {res['false_positive_rate']}, attack success "
                f"{res['attack_success_rate']}, peak {res['peak_mib']:.0f} MiB",
            )
        )
        results.append({"name": name, "detail": res})
    return results


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "cost":
        out = _worker_cost(int(rest[0]), int(rest[1]), int(rest[2]))
    else:
        out = _worker_scenario(rest[0], float(rest[1]))
    print(json.dumps(out))

"""One row of docs/robustness.md, from Python: one attack against every defense.

The same function ``protogalaxy bench robustness`` runs (same settings: MNIST, 30
clients in 3 galaxies, 30% Byzantine, seed 0), for one attack and one partition;
it prints the markdown row. Cells: final accuracy / detection rate /
false-positive rate ('-' without the reputation layer). Run:
python examples/robustness_row.py --attack alie [--partition "Dirichlet(0.5)"]
"""

from __future__ import annotations

import argparse

from protogalaxy.robustness import DEFENSES, PARTITIONS, cell, run_grid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", default="alie")
    parser.add_argument("--partition", default="IID", choices=list(PARTITIONS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    rows = run_grid(
        attacks=[args.attack],
        partitions=[args.partition],
        rounds=args.rounds,
        samples_per_client=args.samples,
        progress=lambda r: print(
            f"  {r['defense']}: {cell(r)} ({r.get('seconds', 0)} s)"
        ),
    )
    print(f"\n{args.partition}\n")
    print("| attack | " + " | ".join(DEFENSES) + " |")
    print("|---" * (len(DEFENSES) + 1) + "|")
    print(f"| {args.attack} | " + " | ".join(cell(r) for r in rows) + " |")


if __name__ == "__main__":
    main()

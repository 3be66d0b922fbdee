"""``protogalaxy bench robustness``: every attack against every defense, and every
compromised-galaxy attack against the audit.

The client table runs the simulation for each (partition, attack, defense) on MNIST
with 30% Byzantine clients and writes a markdown and a CSV table of final accuracy,
detection and false-positive rates, and backdoor success. Detection needs the
reputation layer: defenses without it show "-" there.

The galaxy table runs the default configuration with galaxy 1 of 3 compromised from
round 2 in each of the ways :mod:`protogalaxy.protocol.compromised` knows, through
each runner it is given (``simulate``; ``up``: the services as processes), with the
audit on, and in ``simulate`` with it off for contrast: final accuracy, the round
the galaxy was caught, false attributions and false isolations.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protogalaxy.config import SimulationConfig, load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.protocol.compromised import GALAXY_ATTACKS
from protogalaxy.simulation import Simulation

__all__ = [
    "DEFENSES",
    "DEFENSE_IDS",
    "GALAXY_ATTACKS",
    "PARTITIONS",
    "cell",
    "defense_named",
    "run_galaxy_table",
    "run_grid",
    "write_galaxy_tables",
]

#: a run of one configuration to its summary (simulate's or up's)
Runner = Callable[[SimulationConfig], dict[str, Any]]

ATTACKS = ["label_flip", "sign_flip", "scaling", "gaussian", "backdoor", "alie", "ipm"]

#: name -> (layers, aggregator)
DEFENSES: dict[str, tuple[list[int], str]] = {
    "FedAvg": ([1], "fedavg"),
    "Krum": ([1, 3], "krum"),
    "Multi-Krum": ([1, 3], "multikrum"),
    "Median": ([1, 3], "median"),
    "Trimmed mean": ([1, 3], "trimmed_mean"),
    "ProtoGalaxy-Lite": ([1, 3], "multikrum"),
    "ProtoGalaxy-Full": ([1, 2, 3, 4, 5], "multikrum"),
}

#: the short names ``bench robustness --defenses`` takes: the configuration's
#: aggregator names for the baselines, ``lite`` and ``full`` for ProtoGalaxy
DEFENSE_IDS: dict[str, str] = {
    "fedavg": "FedAvg",
    "krum": "Krum",
    "multikrum": "Multi-Krum",
    "median": "Median",
    "trimmed_mean": "Trimmed mean",
    "lite": "ProtoGalaxy-Lite",
    "full": "ProtoGalaxy-Full",
}


def defense_named(name: str) -> str | None:
    """The table's name of a defense given by its short name or its table name
    (any case), or None."""
    key = name.strip()
    if key.lower() in DEFENSE_IDS:
        return DEFENSE_IDS[key.lower()]
    for table_name in DEFENSES:
        if table_name.lower() == key.lower():
            return table_name
    return None


PARTITIONS: dict[str, dict[str, Any]] = {
    "IID": {"clients.partition": "iid"},
    "Dirichlet(0.5)": {
        "clients.partition": "dirichlet",
        "clients.dirichlet_alpha": 0.5,
    },
}


def run_grid(
    *,
    samples_per_client: int = 500,
    rounds: int = 10,
    seed: int = 0,
    attacks: list[str] | None = None,
    defenses: list[str] | None = None,
    partitions: list[str] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (partition, attack, defense): final accuracy, detection and
    false-positive rates, backdoor success. ``attacks`` may name a user's attack;
    ``partitions`` are keys of :data:`PARTITIONS`."""
    unknown = set(partitions or []) - set(PARTITIONS)
    if unknown:
        raise ValueError(
            f"unknown partitions {sorted(unknown)}; have {list(PARTITIONS)}"
        )
    data = load_dataset("mnist")
    rows = []
    for pname in partitions or list(PARTITIONS):
        pover = PARTITIONS[pname]
        for attack in attacks or ATTACKS:
            for dname in defenses or list(DEFENSES):
                layers, agg = DEFENSES[dname]
                config = load_config(
                    overrides={
                        **pover,
                        "seed": seed,
                        "byzantine.attack": attack,
                        "clients.samples_per_client": samples_per_client,
                        "training.rounds": rounds,
                        "defense.layers": layers,
                        "defense.aggregator": agg,
                    }
                )
                t0 = time.perf_counter()
                s = Simulation(config, dataset=data).run().summary()
                has_rep = 4 in layers
                row = {
                    "partition": pname,
                    "attack": attack,
                    "defense": dname,
                    "final_accuracy": round(s["final_accuracy"], 4),
                    "detection_rate": s["detection_rate"] if has_rep else None,
                    "false_positive_rate": s["false_positive_rate"]
                    if has_rep
                    else None,
                    "backdoor_success": (
                        round(s["attack_success_rate"], 4)
                        if attack == "backdoor"
                        else None
                    ),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def cell(row: dict[str, Any]) -> str:
    """A table cell: accuracy / detection / false positives (bd backdoor success)."""
    text = f"{row['final_accuracy']:.3f}"
    if row["detection_rate"] is not None:
        det, fpr = row["detection_rate"], row["false_positive_rate"]
        text += f" / {_fmt(det)} / {_fmt(fpr)}"
    if row["backdoor_success"] is not None:
        text += f" (bd {row['backdoor_success']:.2f})"
    return text


def write_tables(rows: list[dict[str, Any]], out: Path, *, settings: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "robustness.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Robustness: every attack against every defense",
        "",
        "Generated by `protogalaxy bench robustness --out docs`; do not edit by hand.",
        "",
        settings,
        "",
        "Cells: final accuracy / detection rate / false-positive rate; for the "
        "backdoor also the attack success rate (triggered non-target test images "
        "classified as the target). Detection and false positives need the "
        "reputation layer (4): '-' where it is off. Multi-Krum and ProtoGalaxy-Lite "
        "(layers 1+3 with Multi-Krum) run the same computation here: layer 1 changes "
        "the outcome only when clients send updates that fail integrity, which none "
        "of these attacks do.",
    ]
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    for pname in dict.fromkeys(r["partition"] for r in rows):
        lines += ["", f"## {pname}", "", "| attack | " + " | ".join(defenses) + " |"]
        lines.append("|---" * (len(defenses) + 1) + "|")
        for attack in dict.fromkeys(r["attack"] for r in rows):
            cells = []
            for d in defenses:
                match = [
                    r
                    for r in rows
                    if r["partition"] == pname
                    and r["attack"] == attack
                    and r["defense"] == d
                ]
                if not match:
                    cells.append("")
                    continue
                cells.append(cell(match[0]))
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    (out / "robustness.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_galaxy_table(
    runners: dict[str, Runner],
    *,
    attacks: list[str] | None = None,
    seed: int = 0,
    audit_off: bool = True,
    compromised: int = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every galaxy attack (and no attack, for reference) through every runner
    with the audit on; with it off in the first runner when ``audit_off``."""
    rows = []
    first = next(iter(runners))
    for attack in ["none", *(attacks or GALAXY_ATTACKS)]:
        for name, runner in runners.items():
            for audit in (True, False):
                if not audit and (not audit_off or name != first or attack == "none"):
                    continue
                overrides: dict[str, Any] = {"seed": seed, "audit.enabled": audit}
                if attack != "none":
                    overrides |= {
                        "galaxy_attack.galaxy": compromised,
                        "galaxy_attack.kind": attack,
                    }
                config = load_config(overrides=overrides)
                t0 = time.perf_counter()
                s = runner(config)
                g = s.get("galaxies") or {}
                caught = (g.get("isolated") or {}).get(str(compromised))
                row = {
                    "runner": name,
                    "attack": attack,
                    "audit": "on" if audit else "off",
                    "from_round": config.galaxy_attack.from_round,
                    "final_accuracy": round(float(s["final_accuracy"]), 4),
                    "detection_rate": g.get("detection_rate"),
                    "caught_in_round": caught,
                    "false_attributions": g.get("false_attributions", 0),
                    "false_isolations": len(g.get("false_isolations", [])),
                    "client_detection_rate": s["detection_rate"],
                    "client_false_positive_rate": s["false_positive_rate"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def write_galaxy_tables(
    rows: list[dict[str, Any]], out: Path, *, settings: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "robustness-galaxies.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(dict.fromkeys((r["runner"], r["audit"]) for r in rows))
    lines = [
        "# Robustness: compromised galaxies against the audit",
        "",
        "Generated by `protogalaxy bench robustness --out docs`; do not edit by hand.",
        "",
        settings,
        "",
        "Cells: final accuracy / the round the compromised galaxy was caught and "
        "isolated ('-': never) / false attributions (honest clients whose "
        "reputation fell because of the galaxy's lie) / false isolations (honest "
        "galaxies isolated). `up` runs the real services as local processes. "
        "The attacks are described in `protogalaxy/protocol/compromised.py` and "
        "`docs/verification.md`.",
        "",
        "| galaxy attack | " + " | ".join(f"{n}, audit {a}" for n, a in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for attack in dict.fromkeys(r["attack"] for r in rows):
        cells = []
        for name, audit in columns:
            match = [
                r
                for r in rows
                if (r["attack"], r["runner"], r["audit"]) == (attack, name, audit)
            ]
            if not match:
                cells.append("")
                continue
            r = match[0]
            cells.append(
                f"{r['final_accuracy']:.3f} / {_fmt(r['caught_in_round'])} / "
                f"{r['false_attributions']} / {r['false_isolations']}"
            )
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    (out / "robustness-galaxies.md").write_text(
        "\n".join(lines) + "\n", encoding="utf-8"
    )

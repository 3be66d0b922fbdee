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
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protogalaxy.config import SimulationConfig, load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.protocol.compromised import GALAXY_ATTACKS
from protogalaxy.simulation import Simulation
from protogalaxy.stats import mean_std, paired_t_test

__all__ = [
    "DEFENSES",
    "DEFENSE_IDS",
    "GALAXY_ATTACKS",
    "PARTITIONS",
    "cell",
    "defense_named",
    "pending_runs",
    "run_galaxy_table",
    "run_grid",
    "run_one",
    "significance",
    "summarize",
    "write_galaxy_tables",
    "write_tables",
]

#: a run of one configuration to its summary (simulate's or up's)
Runner = Callable[[SimulationConfig], dict[str, Any]]

ATTACKS = [
    "label_flip",
    "targeted_flip",
    "sign_flip",
    "scaling",
    "gaussian",
    "backdoor",
    "alie",
    "ipm",
    "min_max",
    "min_sum",
    "adaptive",
]

#: name -> (layers, aggregator)
DEFENSES: dict[str, tuple[list[int], str]] = {
    "FedAvg": ([1], "fedavg"),
    "Krum": ([1, 3], "krum"),
    "Multi-Krum": ([1, 3], "multikrum"),
    "Median": ([1, 3], "median"),
    "Trimmed mean": ([1, 3], "trimmed_mean"),
    "Bulyan": ([1, 3], "bulyan"),
    "Centered clipping": ([1, 3], "centered_clipping"),
    "FLTrust": ([1, 3], "fltrust"),
    "ProtoGalaxy-Lite": ([1, 3], "multikrum"),
    "ProtoGalaxy-Full": ([1, 2, 3, 4, 5], "multikrum"),
    # every layer, FLTrust as layer 3: where the operator has a root dataset
    "ProtoGalaxy-Full (FLTrust)": ([1, 2, 3, 4, 5], "fltrust"),
}

#: the short names ``bench robustness --defenses`` takes: the configuration's
#: aggregator names for the baselines, ``lite`` and ``full`` for ProtoGalaxy
DEFENSE_IDS: dict[str, str] = {
    "fedavg": "FedAvg",
    "krum": "Krum",
    "multikrum": "Multi-Krum",
    "median": "Median",
    "trimmed_mean": "Trimmed mean",
    "bulyan": "Bulyan",
    "centered_clipping": "Centered clipping",
    "fltrust": "FLTrust",
    "lite": "ProtoGalaxy-Lite",
    "full": "ProtoGalaxy-Full",
    "full-fltrust": "ProtoGalaxy-Full (FLTrust)",
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


#: the defenses the significance test compares ProtoGalaxy-Full against
BASELINES = ("FedAvg", "Krum", "Multi-Krum", "Median", "Trimmed mean", "Bulyan",
             "Centered clipping", "FLTrust")  # fmt: skip


def _worker_init(threads: int) -> None:
    import torch

    from protogalaxy.logs import setup_logging

    setup_logging("error")  # as the parent: the table, not every quarantine
    torch.set_num_threads(threads)


_DATA: dict[str, Any] = {}


def _overrides(
    partition: str,
    attack: str,
    defense: str,
    fraction: float,
    seed: int,
    *,
    samples_per_client: int,
    rounds: int,
) -> dict[str, Any]:
    """The configuration of one run of the grid, as overrides of the default."""
    layers, agg = DEFENSES[defense]
    overrides = {
        **PARTITIONS[partition],
        "seed": seed,
        "byzantine.attack": attack,
        "byzantine.fraction": fraction,
        "clients.samples_per_client": samples_per_client,
        "training.rounds": rounds,
        "defense.layers": layers,
        "defense.aggregator": agg,
    }
    if fraction != 0.3:  # the rule is told the fraction it faces
        overrides["defense.byzantine_fraction"] = fraction
    return overrides


def defense_key(overrides: dict[str, Any], *, recorded: bool = False) -> str | None:
    """Digest of the defense settings that decide a run (those of the layers it
    runs): a cached row is reused only while it matches, so a changed default
    (``defense.statistics.norm_floor``) reruns the runs it changes and no other.
    ``recorded``: as a row written before rows carried the key ran (settings
    added since at their earlier values). None where the run is infeasible."""
    from protogalaxy.config import ConfigError, _set_dotted, recorded_config

    try:
        if recorded:
            data: dict[str, Any] = {}
            for key, value in overrides.items():
                _set_dotted(data, key, value)
            config = recorded_config(data)
        else:
            config = load_config(overrides=overrides)
    except ConfigError:
        return None
    return _defense_key_of(config)


def _defense_key_of(config: SimulationConfig) -> str:
    """:func:`defense_key` of a configuration already read."""
    import dataclasses

    from protogalaxy.protocol.transcript import digest_hex

    d = dataclasses.asdict(config.defense.build())
    d["layers"] = sorted(d["layers"])
    for layer, section in ((2, "statistics"), (4, "reputation"), (5, "galaxy")):
        if layer not in d["layers"]:
            del d[section]
    return digest_hex(d)


def run_one(
    partition: str,
    attack: str,
    defense: str,
    fraction: float,
    seed: int,
    *,
    samples_per_client: int,
    rounds: int,
    target: float,
) -> dict[str, Any]:
    """One run of the grid: its row (``infeasible`` names why a rule cannot take
    the fraction; its figures are None then)."""
    from protogalaxy.config import ConfigError

    layers, _ = DEFENSES[defense]
    row: dict[str, Any] = {
        "partition": partition, "attack": attack, "defense": defense,
        "fraction": fraction, "seed": seed,
        "samples_per_client": samples_per_client, "rounds": rounds,
    }  # fmt: skip
    overrides = _overrides(
        partition, attack, defense, fraction, seed,
        samples_per_client=samples_per_client, rounds=rounds,
    )  # fmt: skip
    try:
        config = load_config(overrides=overrides)
    except ConfigError as exc:
        return row | {
            "defense_key": None,
            "infeasible": str(exc).split(": ", 1)[-1][:300],
        }
    row["defense_key"] = _defense_key_of(config)
    if "mnist" not in _DATA:
        _DATA["mnist"] = load_dataset("mnist")
    t0 = time.perf_counter()
    result = Simulation(config, dataset=_DATA["mnist"]).run()
    s = result.summary()
    has_rep = 4 in layers
    accuracies = [round(r.accuracy, 4) for r in result.rounds]
    reached = [r.round for r in result.rounds if r.accuracy >= target]
    return row | {
        "final_accuracy": round(s["final_accuracy"], 4),
        "detection_rate": s["detection_rate"] if has_rep else None,
        "false_positive_rate": s["false_positive_rate"] if has_rep else None,
        "attack_success": (
            round(s["attack_success_rate"], 4) if "attack_success_rate" in s else None
        ),
        "rounds_to_target": reached[0] + 1 if reached else None,
        "accuracies": accuracies,
        "seconds": round(time.perf_counter() - t0, 1),
    }


_Key = tuple[str, str, str, float, int]


def _plan(
    *,
    samples_per_client: int,
    rounds: int,
    seed: int,
    seeds: int,
    attacks: list[str] | None,
    defenses: list[str] | None,
    partitions: list[str] | None,
    fractions: list[float] | None,
    cache: Path | None,
) -> tuple[list[_Key], dict[_Key, dict[str, Any]]]:
    """The grid's runs, and the cached rows that still stand for them: same
    settings, and the defense they ran is today's (:func:`defense_key`)."""
    unknown = set(partitions or []) - set(PARTITIONS)
    if unknown:
        raise ValueError(
            f"unknown partitions {sorted(unknown)}; have {list(PARTITIONS)}"
        )
    plan = [
        (p, a, d, fr, sd)
        for p in partitions or list(PARTITIONS)
        for a in attacks or ATTACKS
        for d in defenses or list(DEFENSES)
        for fr in fractions or [0.3]
        for sd in range(seed, seed + seeds)
    ]
    params = {"samples_per_client": samples_per_client, "rounds": rounds}
    cached: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if all(row.get(k) == v for k, v in params.items()):
                key = (row["partition"], row["attack"], row["defense"],
                       row["fraction"], row["seed"])  # fmt: skip
                cached.setdefault(key, []).append(row)
    done: dict[_Key, dict[str, Any]] = {}
    for key in plan:
        rows = cached.get(key)
        if not rows:
            continue
        over = _overrides(*key, samples_per_client=samples_per_client, rounds=rounds)
        today = defense_key(over)
        for row in reversed(rows):  # the latest row that ran today's defense
            ran = (
                row["defense_key"]
                if "defense_key" in row
                else defense_key(over, recorded=True)
            )
            if ran == today:
                done[key] = row
                break
    return plan, done


def pending_runs(grids: list[dict[str, Any]]) -> int:
    """How many runs the grids (:func:`run_grid`'s keyword arguments, without
    ``jobs``, ``target`` and ``progress``) have left to run, together."""
    todo: set[_Key] = set()
    for kw in grids:
        plan, done = _plan(**kw)
        todo |= {k for k in plan if k not in done}
    return len(todo)


def run_grid(
    *,
    samples_per_client: int = 500,
    rounds: int = 10,
    seed: int = 0,
    seeds: int = 1,
    attacks: list[str] | None = None,
    defenses: list[str] | None = None,
    partitions: list[str] | None = None,
    fractions: list[float] | None = None,
    target: float = 0.9,
    jobs: int = 1,
    cache: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (partition, attack, defense, fraction, seed): final accuracy,
    detection and false-positive rates, attack success (backdoor, targeted flip),
    rounds to ``target`` accuracy. ``seeds`` runs seeds ``seed .. seed+seeds-1``;
    ``fractions`` are the Byzantine fractions (0.3 by default). ``attacks`` may
    name a user's attack; ``partitions`` are keys of :data:`PARTITIONS`.

    ``jobs`` processes run at once (each with ``cores / jobs`` torch threads).
    ``cache``, a JSON-lines file, makes the grid resumable: every finished row is
    appended as it ends, and rows already there (same settings, and the defense
    they ran still today's: :func:`defense_key`) are not run again."""
    plan, done = _plan(
        samples_per_client=samples_per_client, rounds=rounds, seed=seed,
        seeds=seeds, attacks=attacks, defenses=defenses, partitions=partitions,
        fractions=fractions, cache=cache,
    )  # fmt: skip
    todo = [k for k in plan if k not in done]
    params = {"samples_per_client": samples_per_client, "rounds": rounds}

    def finish(row: dict[str, Any]) -> None:
        key = (row["partition"], row["attack"], row["defense"], row["fraction"],
               row["seed"])  # fmt: skip
        done[key] = row
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            progress(row)

    kw: dict[str, Any] = params | {"target": target}
    if jobs <= 1:
        for key in todo:
            finish(run_one(*key, **kw))
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(run_one, *key, **kw) for key in todo]
            for fut in as_completed(futures):
                finish(fut.result())
    return [done[k] for k in plan]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def cell(row: dict[str, Any]) -> str:
    """One run's cell: accuracy / detection / false positives (attack success)."""
    if row.get("infeasible"):
        return "n/a"
    text = f"{row['final_accuracy']:.3f}"
    if row["detection_rate"] is not None:
        det, fpr = row["detection_rate"], row["false_positive_rate"]
        text += f" / {_fmt(det)} / {_fmt(fpr)}"
    if row["attack_success"] is not None:
        text += f" (success {row['attack_success']:.2f})"
    return text


METRICS = ("final_accuracy", "detection_rate", "false_positive_rate",
           "attack_success", "rounds_to_target")  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (partition, attack, defense, fraction): over its seeds, the
    mean and standard deviation of every figure (rounds to target over the seeds
    that reached it, with how many did)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["partition"], r["attack"], r["defense"], r["fraction"])
        groups.setdefault(key, []).append(r)
    out = []
    for (partition, attack, defense, fraction), runs in groups.items():
        s: dict[str, Any] = {
            "partition": partition, "attack": attack, "defense": defense,
            "fraction": fraction, "seeds": len(runs),
            "infeasible": next((r["infeasible"] for r in runs
                                if r.get("infeasible")), None),
        }  # fmt: skip
        for m in METRICS:
            vals = [float(r[m]) for r in runs if r.get(m) is not None]
            mean, std = mean_std(vals) if vals else (None, None)
            s[m], s[f"{m}_std"] = mean, std
        s["reached_target"] = sum(r.get("rounds_to_target") is not None for r in runs)
        out.append(s)
    return out


def significance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (partition, attack, fraction): ProtoGalaxy-Full against the
    baseline of highest mean final accuracy, paired by seed (t-test, two-sided)."""
    by: dict[tuple[Any, ...], dict[str, dict[int, float]]] = {}
    for r in rows:
        if r.get("final_accuracy") is None:
            continue
        key = (r["partition"], r["attack"], r["fraction"])
        by.setdefault(key, {}).setdefault(r["defense"], {})[r["seed"]] = float(
            r["final_accuracy"]
        )
    out = []
    for (partition, attack, fraction), defs in by.items():
        full = defs.get("ProtoGalaxy-Full")
        bases = {d: v for d, v in defs.items() if d in BASELINES}
        if not full or not bases:
            continue
        best = max(bases, key=lambda d: mean_std(list(bases[d].values()))[0])
        seeds = sorted(set(full) & set(bases[best]))
        diff, p = paired_t_test(
            [full[s] for s in seeds], [bases[best][s] for s in seeds]
        )
        out.append({"partition": partition, "attack": attack, "fraction": fraction,
                    "best_baseline": best, "difference": diff, "p": p,
                    "pairs": len(seeds)})  # fmt: skip
    return out


def _pm(mean: float | None, std: float | None, n: int, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_cell(s: dict[str, Any]) -> str:
    """A table cell over seeds: accuracy / detection / false positives (attack
    success), each mean ± std."""
    if s["infeasible"]:
        return "n/a"
    n = s["seeds"]
    text = _pm(s["final_accuracy"], s["final_accuracy_std"], n)
    if s["detection_rate"] is not None:
        text += (
            f" / {_pm(s['detection_rate'], s['detection_rate_std'], n, 2)}"
            f" / {_pm(s['false_positive_rate'], s['false_positive_rate_std'], n, 2)}"
        )
    if s["attack_success"] is not None:
        text += f" (success {_pm(s['attack_success'], s['attack_success_std'], n, 2)})"
    return text


def _sig_text(sig: dict[str, Any] | None) -> str:
    if sig is None:
        return ""
    d, p = sig["difference"], sig["p"]
    star = "" if p != p else (" *" if p < 0.05 else "")
    ptext = "n/a" if p != p else f"{p:.3f}"
    return f"{d:+.3f} vs {sig['best_baseline']} (p {ptext}){star}"


def heatmap(
    summary: list[dict[str, Any]], path: Path, *, rows_key: str, title: str
) -> None:
    """Mean final accuracy, ``rows_key`` (attack or fraction) by defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = list(dict.fromkeys(s[rows_key] for s in summary))
    xs = list(dict.fromkeys(s["defense"] for s in summary))
    grid = [[float("nan")] * len(xs) for _ in ys]
    for s in summary:
        if s["final_accuracy"] is not None:
            grid[ys.index(s[rows_key])][xs.index(s["defense"])] = s["final_accuracy"]
    fig, ax = plt.subplots(figsize=(1.1 * len(xs) + 2.5, 0.45 * len(ys) + 1.8))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), xs, rotation=35, ha="right")
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            text = "n/a" if v != v else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if v != v or v < 0.6 else "black")  # fmt: skip
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="final accuracy (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(rows: list[dict[str, Any]], out: Path, *, settings: str) -> None:
    """robustness.md, robustness.csv (one row per setting, over seeds), and a
    heatmap per partition (and of the fraction sweep)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    sigs = {(g["partition"], g["attack"], g["fraction"]): g for g in significance(rows)}
    with open(out / "robustness.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    seeds = max(s["seeds"] for s in summary)
    lines = [
        "# Robustness: every attack against every defense",
        "",
        "Generated by `protogalaxy bench robustness --out docs`; do not edit by hand.",
        "",
        settings,
        "",
        "Cells: final accuracy / detection rate / false-positive rate"
        + (f", each the mean ± standard deviation over {seeds} seeds" if seeds > 1
           else "")
        + "; for the backdoor and the targeted flip also the attack success rate "
        "(triggered non-target test images classified as the target; source-class "
        "images classified as the target). Detection and false positives need the "
        "reputation layer (4): '-' where it is off. 'n/a': the rule cannot take "
        "that many attackers in a galaxy (the configuration is refused). The last "
        "column compares ProtoGalaxy-Full with the baseline of highest mean "
        "accuracy, paired by seed (two-sided t-test; * where p < 0.05).",
    ]  # fmt: skip
    fractions = list(dict.fromkeys(s["fraction"] for s in summary))
    main = 0.3 if 0.3 in fractions else fractions[0]
    defenses = list(dict.fromkeys(s["defense"] for s in summary))

    def table(items: list[dict[str, Any]], key: str, head: str) -> list[str]:
        body = ["| " + head + " | " + " | ".join(defenses) + " | Full vs best |",
                "|---" * (len(defenses) + 2) + "|"]  # fmt: skip
        values = list(dict.fromkeys(s[key] for s in items))
        for value in sorted(values) if key == "fraction" else values:
            row = {s["defense"]: s for s in items if s[key] == value}
            first = next(iter(row.values()))
            sig = sigs.get((first["partition"], first["attack"], first["fraction"]))
            cells = [summary_cell(row[d]) if d in row else "" for d in defenses]
            label = f"{value:.0%}" if key == "fraction" else str(value)
            body.append(f"| {label} | " + " | ".join(cells) + f" | {_sig_text(sig)} |")
        return body

    for pname in dict.fromkeys(s["partition"] for s in summary):
        items = [
            s for s in summary if s["partition"] == pname and s["fraction"] == main
        ]
        if not items:
            continue
        lines += ["", f"## {pname}, {main:.0%} Byzantine", ""]
        lines += table(items, "attack", "attack")
        slug = pname.lower().replace("(", "-").replace(")", "").replace(".", "")
        heatmap(items, out / f"heatmap-{slug}.png", rows_key="attack",
                title=f"{pname}, {main:.0%} Byzantine")  # fmt: skip
        lines += ["", f"![mean final accuracy](heatmap-{slug}.png)"]
    if len(fractions) > 1:
        for pname in dict.fromkeys(s["partition"] for s in summary):
            for attack in dict.fromkeys(s["attack"] for s in summary):
                items = [
                    s
                    for s in summary
                    if s["partition"] == pname and s["attack"] == attack
                ]
                if len({s["fraction"] for s in items}) < 2:
                    continue
                lines += ["", f"## Attacker fraction: {attack}, {pname}", ""]
                lines += table(items, "fraction", "Byzantine")
                slug = f"fractions-{attack}-" + pname.lower().replace("(", "-").replace(
                    ")", "").replace(".", "")  # fmt: skip
                heatmap(items, out / f"heatmap-{slug}.png", rows_key="fraction",
                        title=f"{attack}, {pname}: by attacker fraction")  # fmt: skip
                lines += ["", f"![mean final accuracy](heatmap-{slug}.png)"]
    refused = {(s["defense"], s["fraction"]): s["infeasible"] for s in summary
               if s["infeasible"]}  # fmt: skip
    if refused:
        lines += ["", "Where a rule cannot take the attackers ('n/a'):", ""]
        lines += [
            f"- {d} at {fr:.0%}: {why}" for (d, fr), why in sorted(refused.items())
        ]
    reached = [s for s in summary if s["rounds_to_target"] is not None]
    if reached:
        lines += ["", "Rounds to the target accuracy (mean over the seeds that reached "
                  "it, and how many did) are in `robustness.csv` "
                  "(`rounds_to_target`, `reached_target`)."]  # fmt: skip
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

"""What a run writes: metrics.csv, summary.json, evidence.jsonl, config.yaml, plots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from protogalaxy.simulation import SimulationResult

__all__ = ["write_outputs"]


def write_outputs(result: SimulationResult, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in result.rounds]
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = result.summary()
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2) + "\n", encoding="utf-8"
    )
    with open(out / "evidence.jsonl", "w", encoding="utf-8") as f:
        for event in result.events:
            f.write(json.dumps(event, default=str) + "\n")
    (out / "config.yaml").write_text(
        yaml.safe_dump(result.config.model_dump(), sort_keys=False), encoding="utf-8"
    )
    _plots(result, out)
    return summary


def _plots(result: SimulationResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in result.rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r.accuracy for r in result.rounds], marker="o", label="accuracy")
    if result.rounds[-1].attack_success_rate is not None:
        ax.plot(
            rounds,
            [r.attack_success_rate or 0.0 for r in result.rounds],
            marker="x",
            label="backdoor success",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"{result.config.byzantine.attack} vs {result.config.defense.aggregator}"
    )
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    byz = set(result.byzantine)
    for c, hist in result.reputation_history.items():
        ax.plot(
            rounds[: len(hist)],
            hist,
            color="tab:red" if c in byz else "tab:blue",
            alpha=0.6,
            linewidth=1,
        )
    cfg = result.config.defense.reputation
    ax.axhline(cfg.quarantine_below, color="k", linestyle="--", linewidth=1)
    ax.axhline(cfg.ban_below, color="k", linestyle=":", linewidth=1)
    ax.plot([], [], color="tab:blue", label="honest")
    ax.plot([], [], color="tab:red", label="Byzantine")
    ax.set_xlabel("round")
    ax.set_ylabel("reputation")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("client reputation (dashed: quarantine, dotted: ban)")
    fig.tight_layout()
    fig.savefig(out / "reputation.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in (
        "flags_integrity",
        "flags_statistics",
        "flags_robust",
        "galaxies_excluded",
    ):
        ax.plot(
            rounds, [getattr(r, name) for r in result.rounds], marker=".", label=name
        )
    ax.set_xlabel("round")
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("flags per layer")
    fig.tight_layout()
    fig.savefig(out / "flags.png", dpi=100)
    plt.close(fig)

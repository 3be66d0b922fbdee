"""The main job end to end: the default run through the real command, the defense
doing the work, every attack path, early stopping."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from protogalaxy.config import load_config
from protogalaxy.crypto.merkle import InclusionProof, verify_inclusion
from protogalaxy.defense.robust import available_aggregators
from protogalaxy.learning.attacks import ATTACKS
from protogalaxy.learning.datasets import Dataset
from protogalaxy.simulation import Simulation

pytestmark = pytest.mark.slow


def run(data: Dataset, **overrides: Any) -> dict[str, Any]:
    sim = Simulation(load_config(overrides=overrides), dataset=data)
    return sim.run().summary()


def test_default_run_through_the_command(tmp_path: Path, mnist: Dataset) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round   9 (10/10)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.97
    assert summary["detection_rate"] == 1.0
    assert summary["false_positive_rate"] <= 0.05
    assert summary["rounds"] == 10 and len(summary["byzantine_clients"]) == 9
    assert set(summary["byzantine_clients"]) <= set(summary["quarantined_clients"])
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == list(range(10))
    assert {
        "accuracy",
        "loss",
        "flagged",
        "quarantined",
        "banned",
        "flags_integrity",
        "flags_statistics",
        "flags_robust",
        "aggregation_seconds",
        "round_seconds",
    } <= set(rows[0])
    events = [
        json.loads(line) for line in (out / "evidence.jsonl").read_text().splitlines()
    ]
    quarantined = [e for e in events if e["event"] == "client_quarantined"]
    assert {e["client"] for e in quarantined} == set(summary["byzantine_clients"])
    for e in quarantined:
        ev = e["evidence"]
        verify_inclusion(
            bytes.fromhex(ev["leaf"]),
            InclusionProof.from_dict(ev["inclusion_proof"]),
            bytes.fromhex(ev["galaxy_root"]),
        )
        assert e["reasons"] and ev["metrics"] and e["reputation"] < 0.3
    for name in ("accuracy.png", "reputation.png", "flags.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The operator's view: JSON log lines on stderr, greppable by event.
    logged = [
        json.loads(line)
        for line in proc.stderr.splitlines()
        if '"client_quarantined"' in line
    ]
    assert {e["client"] for e in logged} == set(summary["byzantine_clients"])
    assert all(
        {"galaxy", "round", "reputation", "reasons", "evidence"} <= set(e)
        for e in logged
    )


SMALL = {"clients.samples_per_client": 1000, "training.rounds": 5}


@pytest.mark.parametrize("attack", ["sign_flip", "scaling"])
def test_without_the_defense_the_model_breaks(mnist: Dataset, attack: str) -> None:
    off = run(
        mnist,
        **SMALL,
        **{
            "byzantine.attack": attack,
            "defense.layers": [1],
            "defense.aggregator": "fedavg",
        },
    )
    on = run(mnist, **SMALL, **{"byzantine.attack": attack})
    assert off["final_accuracy"] < 0.5
    assert on["final_accuracy"] > 0.85


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "none"])
def test_every_attack_runs(mnist: Dataset, attack: str) -> None:
    s = run(
        mnist,
        **{
            "byzantine.attack": attack,
            "clients.samples_per_client": 200,
            "training.rounds": 2,
        },
    )
    assert s["rounds"] == 2 and 0.0 <= s["final_accuracy"] <= 1.0
    if attack in ("backdoor", "targeted_flip"):
        assert 0.0 <= s["attack_success_rate"] <= 1.0
    else:
        assert "attack_success_rate" not in s


def test_early_stop(mnist: Dataset) -> None:
    s = run(
        mnist,
        **{
            "clients.samples_per_client": 100,
            "training.rounds": 6,
            "early_stop.enabled": True,
            "early_stop.window": 1,
            "early_stop.min_delta": 1.0,
        },
    )
    assert s["stopped_early"] and s["rounds"] == 2


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("byzantine:\n  fraction: 0.4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "byzantine.fraction 0.4 puts 4 Byzantine clients" in proc.stderr


def test_a_short_run_explains_a_zero_detection_rate(mnist: Dataset) -> None:
    """Four rounds flag the attackers but cannot quarantine them yet: the
    summary says so instead of a bare "detection rate 0.0"."""
    summary = run(mnist, **{"training.rounds": 4, "clients.samples_per_client": 300})
    assert summary["detection_rate"] == 0.0
    assert summary["byzantine_flagged_last_round"] >= 5
    assert "quarantine needs a reputation below 0.3" in summary["note"]
    long = run(mnist, **{"training.rounds": 10, "clients.samples_per_client": 300})
    assert long["detection_rate"] > 0 and "note" not in long


@pytest.mark.parametrize(
    "aggregator", [a for a in available_aggregators() if a != "fedavg"]
)
def test_every_rule_passes_the_audit_of_honest_galaxies(
    mnist: Dataset, aggregator: str
) -> None:
    """The global aggregator replays every galaxy's layer 3: an honest galaxy must
    pass under every rule (Bulyan's selection was once read as a coordinate-wise
    rule's and every galaxy was isolated)."""
    s = run(
        mnist,
        **{
            "defense.aggregator": aggregator,
            "byzantine.fraction": 0.1,
            "defense.byzantine_fraction": 0.1,
            "clients.samples_per_client": 100,
            "training.rounds": 2,
        },
    )
    assert s["galaxies"]["isolated"] == {}
    assert s["final_accuracy"] > 0.15

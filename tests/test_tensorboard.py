"""``simulate --tensorboard DIR`` writes scalars per round and per layer that
TensorBoard itself reads back (its EventAccumulator), equal to metrics.csv."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module", autouse=True)
def _mnist(mnist: object) -> None:
    """Skips without MNIST (the session fixture)."""


def test_tensorboard_scalars_match_the_run(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "clients": {"count": 10, "samples_per_client": 50},
                "galaxies": {"count": 2},
                "byzantine": {"fraction": 0.2, "attack": "backdoor"},
                "training": {"rounds": 3},
            }
        )
    )
    out, board = tmp_path / "run", tmp_path / "tb"
    proc = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config", str(config),
         "--out", str(out), "--tensorboard", str(board)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = EventAccumulator(str(board))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "eval/accuracy", "eval/loss", "eval/attack_success",
        "flags/layer1_integrity", "flags/layer2_statistics", "flags/layer3_robust",
        "flags/byzantine_flagged", "reputation/honest_mean",
        "reputation/byzantine_mean", "clients/quarantined", "galaxies/excluded",
        "time/round_seconds",
    } <= tags  # fmt: skip
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for tag, column in (
        ("eval/accuracy", "accuracy"),
        ("flags/layer2_statistics", "flags_statistics"),
        ("flags/layer3_robust", "flags_robust"),
        ("eval/attack_success", "attack_success_rate"),
    ):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["round"]) for r in rows]
        for e, r in zip(events, rows, strict=True):
            assert e.value == pytest.approx(float(r[column]), rel=1e-6), tag

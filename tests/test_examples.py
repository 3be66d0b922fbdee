"""The examples run (issue 15), and a configuration can name a user's own model by
registered name or by import path, which the run records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from protogalaxy.config import ConfigError, load_config
from protogalaxy.defense.robust import (
    AggregationResult,
    Aggregator,
    coordinate_median,
    get_aggregator,
)
from protogalaxy.learning.attacks import (
    AttackConfig,
    ModelAttackContext,
    model_attack,
    poison_updates,
)
from protogalaxy.learning.models import build_model, register_model
from protogalaxy.robustness import DEFENSES

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow


class TinyNet(nn.Module):
    """A user's model, named in YAML as ``tests.test_examples:TinyNet``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(start_dim=-3))


def _zeros(ctx: ModelAttackContext) -> torch.Tensor:
    return torch.zeros(len(ctx.rows), ctx.updates.shape[1])


#: A user's attack, named in YAML as ``tests.test_examples:zero_update`` (not
#: registered by name: the import path is how another process finds it).
zero_update = model_attack("zero_update_for_tests")(_zeros)


@model_attack("wrong_shape_for_tests")
def wrong_shape(ctx: ModelAttackContext) -> torch.Tensor:
    return torch.zeros(3)


class MedianOfThem(Aggregator):
    """A user's aggregator, named as ``tests.test_examples:MedianOfThem``."""

    name = "median_of_them_for_tests"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: torch.Tensor | None
    ) -> AggregationResult:
        return coordinate_median(updates)


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def _mnist(mnist: object) -> None:
    """Skips without MNIST (the session fixture)."""


@pytest.mark.usefixtures("_mnist")
def test_quickstart() -> None:
    proc = run("quickstart.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 2: accuracy" in proc.stdout and "final_accuracy" in proc.stdout


def test_own_model_and_data() -> None:
    proc = run("own_model_and_data.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model mlp3 on bands" in proc.stdout
    accuracy = float(proc.stdout.split("final accuracy ")[1].split(",")[0])
    assert accuracy > 0.6  # three classes: chance is 0.33


@pytest.mark.usefixtures("_mnist")
def test_a_model_named_by_import_path_runs_and_is_recorded(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tests.test_examples:TinyNet",
                "clients": {"count": 6, "samples_per_client": 50},
                "galaxies": {"count": 2},
                "byzantine": {"fraction": 0.0},
                "defense": {"byzantine_fraction": 0.0},
                "training": {"rounds": 1},
            }
        )
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config", str(config),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["model"] == "tests.test_examples:TinyNet"
    state = torch.load(out / "model.pt")
    assert set(state) == {"fc.weight", "fc.bias"}


def test_unknown_models_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="register your own"):
        load_config(overrides={"model": "mlp9"})
    with pytest.raises(ValueError, match="No module named"):
        build_model("nowhere.at_all:Net")
    with pytest.raises(ValueError, match="already registered"):
        register_model("mnist_cnn", TinyNet)


@pytest.mark.usefixtures("_mnist")
def test_own_attack() -> None:
    proc = run("own_attack.py", "--rounds", "2", "--samples", "60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FedAvg: accuracy" in proc.stdout
    assert "ProtoGalaxy-Full: accuracy" in proc.stdout


@pytest.mark.usefixtures("_mnist")
def test_own_aggregator() -> None:
    proc = run("own_aggregator.py", "--rounds", "1", "--samples", "60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clipped_mean against scaling: accuracy" in proc.stdout


@pytest.mark.usefixtures("_mnist")
def test_robustness_row() -> None:
    proc = run(
        "robustness_row.py", "--attack", "ipm", "--rounds", "1", "--samples", "40"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| ipm |")]
    # a cell per defense (FLTrust and Full (FLTrust) included), and the attack's
    assert len(row) == 1 and row[0].count("|") == len(DEFENSES) + 2
    assert "n/a" in row[0]  # Bulyan cannot take 30% in galaxies of ten


ATTACK = "tests.test_examples:zero_update"
AGGREGATOR = "tests.test_examples:MedianOfThem"


@pytest.mark.usefixtures("_mnist")
def test_an_attack_and_an_aggregator_named_by_import_path_run(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "clients": {"count": 10, "samples_per_client": 50},
                "galaxies": {"count": 2},
                "byzantine": {"fraction": 0.2, "attack": ATTACK},
                "defense": {"layers": [1, 3], "aggregator": AGGREGATOR},
                "training": {"rounds": 1},
            }
        )
    )  # fmt: skip
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config", str(config),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["byzantine"]["attack"] == ATTACK
    assert recorded["defense"]["aggregator"] == AGGREGATOR


def test_a_model_attack_replaces_exactly_the_byzantine_rows() -> None:
    updates = torch.ones(4, 5)
    mask = torch.tensor([False, True, False, True])
    config = AttackConfig(name="tests.test_examples:zero_update")
    out = poison_updates(config, updates, mask, generator=torch.Generator())
    assert out[mask].abs().sum() == 0 and torch.equal(out[~mask], updates[~mask])


def test_a_user_component_that_breaks_its_contract_is_a_clear_error() -> None:
    mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"must return the Byzantine rows.*\(1, 5\)"):
        poison_updates(
            AttackConfig(name="wrong_shape_for_tests"),
            torch.ones(2, 5),
            mask,
            generator=torch.Generator(),
        )
    with pytest.raises(ConfigError, match="not an attack"):
        load_config(overrides={"byzantine.attack": "tests.test_examples:run"})
    with pytest.raises(ConfigError, match="sign_flip"):
        load_config(overrides={"byzantine.attack": "sign_flop"})
    with pytest.raises(ConfigError, match="not a subclass"):
        load_config(overrides={"defense.aggregator": "tests.test_examples:run"})
    with pytest.raises(ValueError, match="already registered"):
        model_attack("alie")(wrong_shape.fn)
    assert get_aggregator("tests.test_examples:MedianOfThem").name.startswith("median")


@model_attack("in_place_for_tests")
def in_place(ctx: ModelAttackContext) -> torch.Tensor:
    ctx.updates.mul_(-5)  # tries to rewrite every row, honest ones included
    return ctx.updates[ctx.rows]


def test_a_model_attack_cannot_touch_honest_rows() -> None:
    updates = torch.ones(4, 3)
    mask = torch.tensor([True, False, False, False])
    out = poison_updates(
        AttackConfig(name="in_place_for_tests"), updates, mask,
        generator=torch.Generator(),
    )  # fmt: skip
    assert torch.equal(out[1:], torch.ones(3, 3)) and torch.equal(
        updates, torch.ones(4, 3)
    )
    assert torch.equal(out[0], torch.full((3,), -5.0))


class BrokenRule(Aggregator):
    name = "broken_for_tests"

    def _aggregate(
        self, updates: torch.Tensor, f: int, weights: torch.Tensor | None
    ) -> AggregationResult:
        return AggregationResult(torch.full((updates.shape[1],), float("nan")))


def test_a_broken_aggregator_is_named_and_its_fallbacks_reported() -> None:
    with pytest.raises(ValueError, match="'broken_for_tests' returned non-finite"):
        BrokenRule()(torch.ones(5, 3))
    config = load_config(overrides={
        "defense.aggregator": "tests.test_examples:BrokenRule",
        "defense.layers": [1, 3],
        "clients.count": 10, "galaxies.count": 2, "clients.samples_per_client": 20,
        "byzantine.fraction": 0.2, "training.rounds": 1,
    })  # fmt: skip
    from protogalaxy.learning.datasets import Dataset
    from protogalaxy.simulation import Simulation

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_tensors(
        "tiny", torch.randn(400, 1, 28, 28, generator=g), torch.arange(400) % 10,
        torch.randn(50, 1, 28, 28, generator=g), torch.arange(50) % 10,
    )  # fmt: skip
    summary = Simulation(config, dataset=data).run().summary()
    assert summary["defense_fallbacks"] == 2  # both galaxies, one round
    assert "fell back to the coordinate median" in summary["note"]

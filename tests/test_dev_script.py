"""./dev simulate sets up only what the simulation needs (issue 15): the test
tooling (redis-server, helm, kubectl, actionlint, checkov, npm) comes with
./dev test. Run for real, traced, on the environment the suite runs in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_dev_simulate_installs_no_test_tooling() -> None:
    env = {**os.environ, "PROTOGALAXY_VENV": sys.prefix}
    proc = subprocess.run(
        ["bash", "-x", str(ROOT / "scripts" / "dev.sh"), "simulate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: protogalaxy simulate" in proc.stdout
    trace = proc.stderr
    for tool in ("install-helm", "install-actionlint", "install-checkov", "apt-get",
                 "npm", "redis-server", "[dev]"):  # fmt: skip
        assert tool not in trace, f"./dev simulate ran {tool}"

"""`protogalaxy up` against `protogalaxy simulate` (issue 4): the same default config,
each run as the command a user types, timed from launch to exit.

The floor is `protogalaxy simulate`; the subject `protogalaxy up` (Redis, the global
aggregator, three galaxies and the client runner as separate processes, talking
HTTP). Runs alternate, simulate first; the figure is the ratio of the medians of the
wall times (goal: <= 1.5). Both must reach the same accuracy, detection rate and
false-positive rate, or the ratio means nothing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import report

EXE = [sys.executable, "-m", "protogalaxy.cli"]


def _timed(args: list[str], out: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    subprocess.run([*EXE, *args, "--out", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "summary.json").read_text())


def run(quick: bool = False) -> list[dict[str, Any]]:
    print("up vs simulate (default config, wall time of each command)")
    pairs = 1 if quick else 2
    sims, ups = [], []
    figures = set()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for name, runs in (("simulate", sims), ("up", ups)):
                wall, summary = _timed([name], Path(tmp) / f"{name}-{i}")
                runs.append(wall)
                figures.add(
                    (
                        name,
                        summary["final_accuracy"],
                        summary["detection_rate"],
                        summary["false_positive_rate"],
                    )
                )
                print(
                    f"  {name:<8} {wall:6.1f} s  accuracy {summary['final_accuracy']}"
                    f"  detection {summary['detection_rate']}"
                    f"  fpr {summary['false_positive_rate']}"
                )
    same = len({f[1:] for f in figures}) == 1
    ratio = statistics.median(ups) / statistics.median(sims)
    return [
        report(
            "protogalaxy up / simulate, wall time",
            ratio,
            "<= 1.50",
            ratio <= 1.5 and same,
            f"simulate {statistics.median(sims):.1f} s, up "
            f"{statistics.median(ups):.1f} s (medians of {pairs}); "
            + ("same figures" if same else f"FIGURES DIFFER: {sorted(figures)}"),
        )
    ]

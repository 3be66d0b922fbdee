"""checkov's Kubernetes checks on what the chart renders, for every charts/ci
values file. The checks skipped are the ones charts/README.md justifies."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import CHART

CHECKOV = CHART.parent / ".tools" / "checkov" / "bin" / "checkov"


def justified() -> list[str]:
    """The check ids in charts/README.md's checkov table."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("### checkov", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (CKV[^|]*)\|", section, re.M)
    ids = {i for row in rows for i in re.findall(r"CKV2?_K8S_\d+", row)}
    # the helm test pod's probes are skipped on that pod only (annotations)
    return sorted(ids - {"CKV_K8S_8", "CKV_K8S_9"})


def test_the_rendered_chart_passes_checkov(helm: Path, tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.fail("checkov is not installed: scripts/install-checkov.sh")
    skipped = justified()
    assert skipped, "charts/README.md lists no checkov checks"
    for values in sorted((CHART / "ci").glob("*-values.yaml")):
        out = subprocess.run(
            [str(helm), "template", "pg", str(CHART), "-n", "fl", "-f", str(values)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (tmp_path / f"{values.stem}.yaml").write_text(out)
    done = subprocess.run(
        [str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes",
         "--skip-check", ",".join(skipped), "-o", "json", "--quiet",
         "--skip-download"],  # offline: no policy download from the vendor
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, done.stdout[:2000]  # it looked at the objects

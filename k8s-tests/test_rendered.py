"""The rendered-chart driver's own rules, against the real helm binary and real
processes: what it would get wrong would make every scenario wrong."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rendered import (
    RenderedDriver,
    Unsupported,
    _Cluster,
    _Job,
    expand,
    rewrite_paths,
    secret_data,
    selector_matches,
)


def wait_for(predicate: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[_Cluster]:
    c = _Cluster(tmp_path, "ns-test")
    try:
        yield c
    finally:
        c.stop(grace=1)


@pytest.fixture
def rendered(tmp_path: Path, helm_binary: str) -> Iterator[RenderedDriver]:
    d = RenderedDriver(tmp_path, helm=helm_binary)
    try:
        yield d
    finally:
        d.teardown()


def pod_template(script: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "c",
        "image": "busybox",
        "command": [sys.executable, "-c", script],
    }
    container.update(spec.pop("container", {}))
    return {
        "metadata": {"labels": {"app": "t"}},
        "spec": {"restartPolicy": "OnFailure", "containers": [container], **spec},
    }


def test_env_expansion_is_kubernetes_own() -> None:
    env = {"A": "x", "B": "y"}
    assert expand("$(A)-$(B)", env) == "x-y"
    assert expand("$(MISSING)", env) == "$(MISSING)"  # left as written
    assert expand("$$(A)", env) == "$(A)"  # escaped
    assert expand("a$b$", env) == "a$b$"
    assert expand("$(A", env) == "$(A"


def test_paths_under_a_mount_are_rewritten_once(tmp_path: Path) -> None:
    mounts = [("/tmp", tmp_path / "tmp"), ("/data", Path("/tmp/pvc"))]
    # /data becomes a path under /tmp: the /tmp mount must not rewrite it again
    assert rewrite_paths("--dir /data/r1", mounts) == "--dir /tmp/pvc/r1"
    assert rewrite_paths("/tmp/x", mounts) == f"{tmp_path}/tmp/x"
    for untouched in ("/database", "x/data", "http://h/data", "/etc/data"):
        assert rewrite_paths(untouched, mounts) == untouched


def test_selectors() -> None:
    labels = {"app": "pg", "component": "galaxy"}
    assert selector_matches({"app": "pg"}, labels)
    assert not selector_matches({"app": "other"}, labels)
    assert not selector_matches({}, labels)  # no selector: no endpoints
    assert selector_matches(
        {"matchExpressions": [{"key": "component", "operator": "In",
                               "values": ["galaxy", "global"]}]},
        labels,
    )  # fmt: skip


def test_an_object_the_driver_does_not_know_is_refused(
    rendered: RenderedDriver,
) -> None:
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "pg"}, "spec": {}}  # fmt: skip
    with pytest.raises(Unsupported, match="Ingress pg"):
        rendered._classify([ingress])
    # The kinds it skips are recorded with the reason.
    policy = {"kind": "NetworkPolicy", "metadata": {"name": "np"}, "spec": {}}
    rendered._classify([policy])
    assert rendered.skipped[0][:2] == ("NetworkPolicy", "np")


def test_a_job_rendered_again_with_another_template_is_refused(
    rendered: RenderedDriver,
) -> None:
    """What the API server answers ``helm upgrade`` for a Job whose name stayed
    and whose pod template changed (a pinned run id): nothing is applied."""
    job: dict[str, Any] = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
        "spec": {"completions": 1, "template": pod_template("pass")},
    }  # fmt: skip
    rendered.applied = {("Job", "j"): job}
    changed = {**job, "spec": {**job["spec"], "template": pod_template("1")}}
    with pytest.raises(RuntimeError, match=r"spec\.template: field is immutable"):
        rendered._apply([changed], upgrade=True)


def test_an_upgrade_keeps_generated_secrets_as_lookup_would(
    rendered: RenderedDriver,
) -> None:
    """``helm template`` cannot look the Secrets up: the driver keeps what the
    previous apply generated, in the Secret's keys and in what embeds them (the
    ACL), and the checksums of unchanged Secrets, so nothing rolls for nothing."""
    run = {"clients.count": 50, "byzantine.fraction": 0.2}
    first = rendered._render(rendered._sets(run), upgrade=False)
    rendered.applied = {(d["kind"], d["metadata"]["name"]): d for d in first}

    def by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    before = by_key(first)
    same = by_key(rendered._render_upgrade(run))
    for (kind, name), d in before.items():
        if kind == "Secret":
            assert secret_data(same[kind, name]) == secret_data(d), name
        if kind in ("Deployment", "StatefulSet"):
            assert same[kind, name]["spec"]["template"] == d["spec"]["template"], name
    # Two more galaxies: the old passwords stay, in their keys and in the ACL;
    # the new ones are new; Redis's template changes (its ACL did).
    more = by_key(rendered._render_upgrade({**run, "galaxies.count": 5}))
    # (what a render of its own would have made: other passwords)
    again = {
        d["metadata"]["name"]: d
        for d in rendered._render(rendered._sets(run), upgrade=True)
        if d["kind"] == "Secret"
    }
    (redis,) = [n for k, n in before if k == "StatefulSet" and n.endswith("-redis")]
    old = secret_data(before["Secret", redis])
    new = secret_data(more["Secret", redis])
    acl = new["users.acl"].decode()

    def in_acl(password: bytes) -> bool:  # plaintext (>pw) or hashed (#sha256)
        sha = hashlib.sha256(password).hexdigest()
        return f">{password.decode()} " in acl or f"#{sha} " in acl

    for g in range(3):
        key = f"galaxy-{g}-password"
        assert new[key] == old[key]
        assert in_acl(old[key]), key
    assert in_acl(new["galaxy-4-password"])
    assert not in_acl(secret_data(again[redis])["galaxy-0-password"])
    assert (
        more["StatefulSet", redis]["spec"]["template"]
        != before["StatefulSet", redis]["spec"]["template"]
    )


def test_service_names_resolve_to_their_address_in_python_processes(
    cluster: _Cluster,
) -> None:
    cluster.apply_service(
        {"kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "t"}, "ports": [{"port": 8000}]}}
    )  # fmt: skip
    address = cluster.services["web"].address
    probe = (
        "import socket\n"
        "for n in ('web', 'web.ns-test', 'web.ns-test.svc.cluster.local'):\n"
        "    print(socket.getaddrinfo(n, 8000)[0][4])\n"
        "try:\n"
        "    socket.getaddrinfo('nothere', 80)\n"
        "except socket.gaierror as e:\n"
        "    print('refused', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(cluster.dns), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[:3] == [str((address, 8000))] * 3
    assert lines[3].startswith("refused") and "no such Service" in lines[3]


def test_an_indexed_job_runs_at_most_parallelism_pods_and_the_next_on_success(
    cluster: _Cluster, tmp_path: Path
) -> None:
    """completions 3, parallelism 2: indexes 0 and 1 start, 2 waits until one of
    them succeeds; each pod has its JOB_COMPLETION_INDEX."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (
        "import os, pathlib, time\n"
        f"d = pathlib.Path({str(marks)!r})\n"
        "i = os.environ['JOB_COMPLETION_INDEX']\n"
        "(d / f'started-{i}').touch()\n"
        "while not (d / f'go-{i}').exists(): time.sleep(0.05)\n"
    )
    job = {"kind": "Job", "metadata": {"name": "work"},
           "spec": {"completions": 3, "parallelism": 2, "completionMode": "Indexed",
                    "backoffLimit": 0, "template": pod_template(script)}}  # fmt: skip
    with cluster.lock:
        cluster.jobs["work"] = state = _Job(job)

    def started() -> set[str]:
        return {p.name.split("-")[1] for p in marks.glob("started-*")}

    wait_for(lambda: started() == {"0", "1"}, "indexes 0 and 1 did not start")
    time.sleep(1.0)  # the controller ran several times meanwhile
    assert started() == {"0", "1"}  # index 2 waits for a free slot
    (marks / "go-1").touch()
    wait_for(lambda: "2" in started(), "index 2 did not start after 1 succeeded")
    (marks / "go-0").touch()
    (marks / "go-2").touch()
    wait_for(lambda: state.state == "Complete", "the Job did not complete")
    assert state.succeeded == {0, 1, 2} and state.failures == 0


def test_a_failing_job_pod_is_restarted_until_the_backoff_limit(
    cluster: _Cluster,
) -> None:
    job = {"kind": "Job", "metadata": {"name": "bad"},
           "spec": {"completions": 1, "parallelism": 1, "backoffLimit": 1,
                    "template": pod_template("raise SystemExit(3)")}}  # fmt: skip
    with cluster.lock:
        cluster.jobs["bad"] = state = _Job(job)
    wait_for(lambda: state.state == "Failed", "the Job did not fail", timeout=180)
    # The first run and one restart in the same pod (OnFailure), then no more.
    assert state.failures == 2
    events = (cluster.workdir / "events.log").read_text()
    assert events.count("c exited 3") == 2
    assert "BackoffLimitExceeded" in events


def test_a_failed_startup_probe_kills_and_restarts_the_container(
    cluster: _Cluster, tmp_path: Path
) -> None:
    """The kubelet kills a container whose startup probe fails failureThreshold
    times in a row, and the restart policy starts it again."""
    runs = tmp_path / "runs"
    script = (
        "import pathlib, time\n"
        f"p = pathlib.Path({str(runs)!r}); p.write_text(p.read_text() + 'x' "
        "if p.exists() else 'x')\n"
        "time.sleep(600)\n"
    )
    template = pod_template(
        script,
        restartPolicy="Always",
        terminationGracePeriodSeconds=1,
        container={"startupProbe": {"exec": {"command": ["false"]},
                                    "periodSeconds": 1, "failureThreshold": 2}},
    )  # fmt: skip
    deployment = {"kind": "Deployment", "metadata": {"name": "slow"},
                  "spec": {"replicas": 1, "template": template}}  # fmt: skip
    with cluster.lock:
        cluster.deployments["slow"] = deployment
    wait_for(
        lambda: runs.exists() and runs.read_text() == "xx",
        "the container was not killed and started again",
        timeout=180,
    )
    (pod,) = cluster.owned("Deployment", "slow")
    assert pod.restarts >= 1 and not pod.ready
    assert "startup probe failed 2 times" in pod.log.read_text()

"""Drivers for the scenarios. By default ``rendered`` (what ``helm template``
renders, run as local processes: the chart's own wiring, on every change; see
rendered.py) and ``kube`` (the cluster in KUBECONFIG; skipped with the reason when
none answers). ``local`` (``protogalaxy up``'s processes, without the chart; its
own tests are in tests/services) runs when named. ``PG_K8S_DRIVERS`` picks a
comma-separated list, e.g. ``kube`` in the kind workflow."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from drivers import (
    ROOT,
    Driver,
    KubeDriver,
    LocalDriver,
    cluster_answers,
    cluster_tools,
)
from rendered import RenderedDriver

KNOWN = ("rendered", "kube", "local")
DRIVERS = [
    d.strip()
    for d in os.environ.get("PG_K8S_DRIVERS", "rendered,kube").split(",")
    if d.strip()
]
_unknown = sorted(set(DRIVERS) - set(KNOWN))
if _unknown or not DRIVERS:
    raise pytest.UsageError(
        f"PG_K8S_DRIVERS={os.environ.get('PG_K8S_DRIVERS')!r}: unknown drivers "
        f"{_unknown}; choose from {', '.join(KNOWN)}"
    )


@pytest.fixture(scope="session")
def kube_tools() -> tuple[str, str]:
    """helm and kubectl for the cluster in KUBECONFIG. Without one the kube tests
    skip, unless PG_K8S_DRIVERS names the kube driver (the kind workflow): then a
    missing tool or cluster is an error, never a green run that tested nothing."""
    named = "kube" in os.environ.get("PG_K8S_DRIVERS", "").split(",")
    tools = cluster_tools()
    why: str | None
    if tools is None:
        why = "helm or kubectl is not installed (scripts/install-helm.sh)"
    else:
        why = cluster_answers(tools[1])
    if why is not None:
        if named:
            pytest.fail(f"PG_K8S_DRIVERS names the kube driver, but: {why}")
        pytest.skip(f"no Kubernetes cluster: {why}")
    assert tools is not None
    return tools


@pytest.fixture(scope="session")
def helm_binary() -> str:
    """The real helm (scripts/install-helm.sh puts it in .tools/bin, as ./dev
    does); the rendered driver needs it and nothing else of Kubernetes."""
    subprocess.run([str(ROOT / "scripts" / "install-helm.sh")], check=True)
    exe = ROOT / ".tools" / "bin" / "helm"
    if not exe.exists():
        pytest.fail("scripts/install-helm.sh did not install helm")
    return str(exe)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item: the driver fixture dumps a
    failed scenario's deployment."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """A fresh deployment per test: a new namespace, or a new set of processes
    (the rendered driver's logs, events and state stay in the test's tmp_path)."""
    if request.param == "kube":
        helm, kubectl = request.getfixturevalue("kube_tools")
        d: Driver = KubeDriver(helm, kubectl)
    elif request.param == "rendered":
        d = RenderedDriver(tmp_path, helm=request.getfixturevalue("helm_binary"))
    else:
        d = LocalDriver(tmp_path)
    try:
        yield d
    finally:
        call = getattr(request.node, "report_call", None)
        failed = call is None or call.failed
        if isinstance(d, KubeDriver):
            d.teardown(failed, label=request.node.nodeid)
        else:
            d.teardown()
        if failed and isinstance(d, RenderedDriver):
            print(f"rendered: logs, events and pod states in {tmp_path}")

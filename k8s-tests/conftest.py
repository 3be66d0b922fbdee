"""Drivers for the scenarios: ``local`` (always; the services as processes) and
``kube`` (the cluster in KUBECONFIG; skipped with the reason when none answers).
``PG_K8S_DRIVERS=kube`` (the kind workflow) or ``local`` picks one."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from drivers import (
    Driver,
    KubeDriver,
    LocalDriver,
    cluster_answers,
    cluster_tools,
)

DRIVERS = os.environ.get("PG_K8S_DRIVERS", "local,kube").split(",")


@pytest.fixture(scope="session")
def kube_tools() -> tuple[str, str]:
    tools = cluster_tools()
    if tools is None:
        pytest.skip("helm or kubectl is not installed (scripts/install-helm.sh)")
    why = cluster_answers(tools[1])
    if why is not None:
        pytest.skip(f"no Kubernetes cluster: {why}")
    return tools


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """A fresh deployment per test: a new namespace, or a new set of processes."""
    if request.param == "kube":
        helm, kubectl = request.getfixturevalue("kube_tools")
        d: Driver = KubeDriver(helm, kubectl)
    else:
        d = LocalDriver(tmp_path)
    try:
        yield d
    finally:
        d.teardown()

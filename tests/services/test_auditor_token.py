"""A galaxy checks the auditors' token without holding it: with it, a
compromised galaxy could read every galaxy's published updates from the global
aggregator's audit endpoints (the review found every galaxy pod mounted it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from protogalaxy.services.up import LocalCluster
from tests.services.players import played_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    yield from played_cluster(tmp_path / "run")


def test_a_galaxy_checks_the_auditor_token_by_its_hash(cluster: LocalCluster) -> None:
    url = f"{cluster.galaxy_url(0)}/v1/audit/rounds/0/transcript"
    right = httpx.get(url, headers={"authorization": f"Bearer {cluster.auditor_token}"})
    assert right.status_code != 401, right.text  # admitted (nothing published yet)
    for token in ("wrong", cluster.auditor_token[:-1], "x" + cluster.auditor_token):
        wrong = httpx.get(url, headers={"authorization": f"Bearer {token}"})
        assert wrong.status_code == 401, (token, wrong.text)
    # The galaxy process never had the token itself, only its digest.
    popen = cluster.procs["galaxy-0"].popen
    assert popen is not None
    environ = Path(f"/proc/{popen.pid}/environ").read_bytes()
    assert cluster.auditor_token.encode() not in environ
    assert b"PG_AUDITOR_TOKEN_SHA256=" in environ

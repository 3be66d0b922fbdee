"""Schemathesis over both services' OpenAPI documents, on loopback: every
operation with generated (and broken) input, a bounded number of examples each;
no answer may be a 5xx, and every refusal is in the one error format."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from protogalaxy.services.up import LocalCluster
from tests.services.players import played_cluster

pytestmark = pytest.mark.slow

EXAMPLES = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from played_cluster(
        Path(tmp_path_factory.mktemp("fuzz")), max_update_bytes=200_000
    )


def fuzz(url: str) -> int:
    """Every operation of the OpenAPI document at ``url``, ``EXAMPLES`` generated
    cases each; the number of operations."""
    schema = schemathesis.openapi.from_url(url)
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            answered_without_a_server_error(case)

        check()
    return operations


def answered_without_a_server_error(case: Any) -> None:
    resp = case.call(timeout=30)
    assert resp.status_code < 500, (case.method, case.path, resp.text[:300])
    if resp.status_code >= 400:
        assert set(resp.json()) == {"error", "detail"}, resp.text[:300]


def test_the_galaxy_never_answers_5xx(cluster: LocalCluster) -> None:
    assert fuzz(cluster.galaxy_url(0) + "/openapi.json") >= 10


def test_the_global_aggregator_never_answers_5xx(cluster: LocalCluster) -> None:
    assert fuzz(cluster.global_url + "/openapi.json") >= 10

"""Two runs never mix: during a ``helm upgrade`` that starts a new run, pods of
the old run may still answer behind a Service. A request that names another run
gets 409 ``wrong_run`` before anything reads it, every answer names its run, and
a client of the new run waits for pods of its run instead of taking part in (or
reading the end of) the old one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from protogalaxy.services.client_runner import ClientRunner, ClientSettings, WrongRun
from protogalaxy.services.common import RUN_HEADER
from protogalaxy.services.up import LocalCluster
from tests.services.players import Players, played_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    yield from played_cluster(tmp_path / "run")


def test_a_request_for_another_run_is_refused_before_it_is_read(
    cluster: LocalCluster,
) -> None:
    players = Players(cluster, 1)
    url = players.url("/v1/register")
    wrong = httpx.post(url, json=players.registration(0), headers={RUN_HEADER: "next"})
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["error"] == "wrong_run"
    assert wrong.headers[RUN_HEADER] == cluster.run_id
    # Nothing was taken: the same client registers in its own run afterwards,
    # and a second registration is the duplicate, not the first.
    right = httpx.post(url, json=players.registration(0))
    assert right.status_code == 201, right.text
    assert right.headers[RUN_HEADER] == cluster.run_id
    # The global aggregator checks the same header on what galaxies send it.
    status = httpx.get(cluster.global_url + "/v1/status", headers={RUN_HEADER: "next"})
    assert status.status_code == 409 and status.json()["error"] == "wrong_run"


def test_a_client_of_the_next_run_waits_for_its_run(cluster: LocalCluster) -> None:
    settings = ClientSettings(
        client_ids=(0,),
        galaxy_url_template=None,
        galaxy_urls=(cluster.galaxy_url(0),),
        client_seed_file=str(cluster.keys / "clients.seed"),
        global_public_key=cluster.global_public_key,
        run_id="the-next-run",
        config_path=str(cluster.config_path),
        retries=0,
        wrong_run_patience_s=1.0,
    )
    runner = ClientRunner(settings)
    # It retries past its (zero) retries while the old run answers, then gives
    # up: it never registered with the old run, nor read its state as its own.
    with pytest.raises(WrongRun, match=f"answered by run '{cluster.run_id}'"):
        runner.request("GET", cluster.galaxy_url(0) + "/v1/round")
    with pytest.raises(WrongRun):
        runner.register()

"""Waiting clients cost a galaxy one request per phase change, not one per poll.

Real redis-server and uvicorn processes: ``GET /v1/round?view=..&wait_s=..``
answers when the galaxy's view changes (the test's players commit and the commit
phase closes) and a client runner waiting on a galaxy whose phase does not move
sends it a handful of requests, where polling every 50 ms would send dozens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protogalaxy.services.client_runner import ClientRunner, ClientSettings
from protogalaxy.services.up import LocalCluster
from tests.services.players import Players, played_cluster, update

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from played_cluster(
        Path(tmp_path_factory.mktemp("long-poll")),
        extra_env={"PG_MAX_LONG_POLLS": "2"},
    )


def gets(cluster: LocalCluster) -> float:
    text = httpx.get(cluster.galaxy_url(0) + "/metrics").text
    for line in text.splitlines():
        if line.startswith('protogalaxy_galaxy_http_requests_total{method="GET"} '):
            return float(line.split()[-1])
    raise AssertionError("no request counter in /metrics")


def runner(cluster: LocalCluster, **settings: Any) -> ClientRunner:
    return ClientRunner(
        ClientSettings(
            client_ids=(0,),
            galaxy_url_template=None,
            galaxy_urls=(cluster.galaxy_url(0),),
            client_seed_file=str(cluster.keys / "clients.seed"),
            global_public_key=cluster.global_public_key,
            run_id=cluster.run_id,
            config_path=str(cluster.config_path),
            **settings,
        )
    )


def test_a_waiting_runner_sends_a_few_requests_not_one_per_poll(
    cluster: LocalCluster,
) -> None:
    # Round 0 stays in its commit phase (nobody commits, the deadline is 10
    # minutes away). For 3 s the runner waits on a phase that does not come:
    # with 1 s long polls that is about 4 requests; polling every 50 ms (the
    # runner's poll_s) would be about 60.
    url = cluster.galaxy_url(0) + "/v1/round"
    start = time.monotonic()
    while httpx.get(url).json()["round"] is None:
        assert time.monotonic() - start < 60, "round 0 never opened"
        time.sleep(0.1)
    r = runner(cluster, long_poll_s=1.0, poll_s=0.05)
    before = gets(cluster)
    end = time.monotonic() + 3.0
    states = r.wait(lambda s: time.monotonic() > end)
    sent = gets(cluster) - before - 1  # the counter's own GET /metrics
    assert states[0]["phase"] == "commit"
    assert sent <= 8, f"{sent} requests while waiting 3 s"


def test_a_long_poll_answers_when_the_view_changes(cluster: LocalCluster) -> None:
    url = cluster.galaxy_url(0) + "/v1/round"
    players = Players(cluster, 4)
    players.register()
    now = httpx.get(url).json()
    assert now["phase"] == "commit" and now["view"]
    rnd = now["round"]
    answer: dict[str, Any] = {}

    def wait() -> None:
        answer.update(
            httpx.get(
                url, params={"view": now["view"], "wait_s": 30}, timeout=60
            ).json()
        )

    waiter = threading.Thread(target=wait)
    waiter.start()
    # The limit of waiters (2 here) is enforced: a third wait is refused, and
    # a plain request is still answered.
    time.sleep(0.5)
    extra = threading.Thread(target=wait)
    extra.start()
    time.sleep(0.5)
    third = httpx.get(url, params={"view": now["view"], "wait_s": 30}, timeout=60)
    assert third.status_code == 429 and third.json()["error"] == "too_many_waiters"
    assert httpx.get(url).status_code == 200
    for c in range(4):  # every client commits: the commit phase closes
        players.commit(rnd, c, update(c))
    # It answers on the change: well before its 30 s are up (without the wake it
    # would sit out the 30 s, then answer the same new phase).
    waiter.join(timeout=20)
    assert not waiter.is_alive(), "the long poll did not wake on the change"
    extra.join(timeout=60)
    assert answer["view"] != now["view"]
    assert (answer["round"], answer["phase"]) != (rnd, "commit")

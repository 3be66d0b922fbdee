"""What a review of the scale work (issue 14) reproduced, each now fixed: long polls
that a client hangs up on, the chart's waiter and connection limits, a long-poll
setting beyond the galaxy's cap, the verification memo reading a signature twice,
and a backdoor's share depending on its training chunk. Real parts only:
redis-server and uvicorn processes on loopback, the real helm binary.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch
import yaml

from protogalaxy.crypto.errors import SignatureError
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.learning.attacks import AttackConfig, data_transform
from protogalaxy.learning.training import BatchedTrainer, ClientTask
from protogalaxy.services.client_runner import ClientRunner, ClientSettings
from protogalaxy.services.up import LocalCluster
from tests.deploy.conftest import helm  # noqa: F401 - the fixture
from tests.services.players import played_cluster

ROOT = Path(__file__).resolve().parents[1]

# -- galaxy long polls ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_galaxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # uvicorn's limit_concurrency at 8; PG_MAX_LONG_POLLS left at its default
    yield from played_cluster(
        Path(tmp_path_factory.mktemp("hung-up")),
        extra_env={"PG_MAX_CONNECTIONS": "8"},
    )


def _open_round_view(url: str) -> str:
    start = time.monotonic()
    while True:
        now = httpx.get(url + "/v1/round").json()
        if now["round"] is not None:
            return str(now["view"])
        assert time.monotonic() - start < 60, "round 0 never opened"
        time.sleep(0.1)


def _long_poll_and_hang_up(port: int, view: str, wait_s: float) -> None:
    """Send one long poll and close the connection at once: at most one
    connection of this peer is ever open."""
    request = (
        f"GET /v1/round?view={quote(view, safe='')}&wait_s={wait_s} HTTP/1.1\r\n"
        "Host: galaxy\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())


@pytest.mark.slow
def test_hung_up_long_polls_do_not_take_the_galaxy_off_the_air(
    small_galaxy: LocalCluster,
) -> None:
    # An unauthenticated peer sends 8 long polls, hanging up right after each
    # one (so PG_MAX_CONNECTIONS_PER_PEER never sees more than one connection).
    # The galaxy must go on answering everyone, its liveness probe included.
    url = small_galaxy.galaxy_url(0)
    view = _open_round_view(url)
    answers = []
    for _ in range(8):
        _long_poll_and_hang_up(small_galaxy.galaxy_ports[0], view, wait_s=5)
        # one round trip after each: the galaxy has taken the hung-up request in
        # before the next arrives (else uvicorn refuses a burst by connections)
        answers.append(httpx.get(url + "/livez"))
    answers.append(httpx.get(url + "/v1/round"))
    # let the orphaned waits run out before the cluster stops
    deadline = time.monotonic() + 30
    while httpx.get(url + "/livez").status_code != 200:
        assert time.monotonic() < deadline, "the galaxy never came back"
        time.sleep(0.5)
    codes = [a.status_code for a in answers]
    assert codes == [200] * 9, f"answers after each hung-up long poll: {codes}"


@pytest.fixture(scope="module")
def two_waiters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from played_cluster(
        Path(tmp_path_factory.mktemp("review14-waiters")),
        extra_env={"PG_MAX_LONG_POLLS": "2"},
    )


@pytest.mark.slow
def test_a_hung_up_long_poll_gives_its_slot_back(two_waiters: LocalCluster) -> None:
    url = two_waiters.galaxy_url(0)
    view = _open_round_view(url)
    for _ in range(2):
        _long_poll_and_hang_up(two_waiters.galaxy_ports[0], view, wait_s=10)
        assert httpx.get(url + "/livez").status_code == 200  # taken in
    honest = httpx.get(url + "/v1/round", params={"view": view, "wait_s": 1})
    assert honest.status_code == 200, honest.text


@pytest.mark.slow
def test_a_long_poll_setting_beyond_the_galaxys_cap_is_refused_or_capped(
    two_waiters: LocalCluster,
) -> None:
    c = two_waiters
    try:
        runner = ClientRunner(
            ClientSettings(
                client_ids=[0],
                galaxy_url_template=None,
                galaxy_urls=(c.galaxy_url(0),),
                client_seed_file=str(c.keys / "clients.seed"),
                global_public_key=c.global_public_key,
                run_id=c.run_id,
                config_path=str(c.config_path),
                long_poll_s=45.0,
                poll_s=0.05,
            )
        )
    except ValueError as exc:  # refused up front, naming the setting: fine
        assert "long_poll" in str(exc).lower()
        return
    _open_round_view(c.galaxy_url(0))
    end = time.monotonic() + 2.0
    states = runner.wait(lambda s: s[0]["round"] is not None and time.monotonic() > end)
    assert states[0]["phase"] == "commit"


def _galaxy_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    for doc in docs:
        if (
            doc
            and doc.get("kind") == "Deployment"
            and "galaxy" in str(doc["metadata"]["name"])
        ):
            container = doc["spec"]["template"]["spec"]["containers"][0]
            return {e["name"]: str(e.get("value")) for e in container["env"]}
    raise AssertionError("no galaxy Deployment rendered")


def test_the_chart_keeps_long_polls_below_the_connection_limit(
    helm: Path,  # noqa: F811 - the fixture imported above
) -> None:
    out = subprocess.run(
        [
            str(helm),
            "template",
            "pg",
            str(ROOT / "charts"),
            "--set",
            "clients.count=3000",
            "--set",
            "clients.perPod=1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    env = _galaxy_env(list(yaml.safe_load_all(out.stdout)))
    waiters = int(env["PG_MAX_LONG_POLLS"])
    connections = int(env.get("PG_MAX_CONNECTIONS", "1024"))  # services/__main__
    assert waiters < connections, (
        f"{waiters} long polls may wait on a galaxy that serves {connections} "
        "connections in all: its commits, reveals and probes get 503"
    )


# -- the verification memo ----------------------------------------------------


class _Shifty(bytearray):
    """A signature buffer that reads differently the second time (a caller's
    buffer reused by another thread while the check runs)."""

    def __init__(self, first: bytes, then: bytes) -> None:
        super().__init__(then)
        self._reads = [first, then]

    def __bytes__(self) -> bytes:
        return self._reads.pop(0) if len(self._reads) > 1 else self._reads[0]


def test_the_memo_records_the_signature_that_was_checked() -> None:
    key = SigningKey.generate()
    genuine = key.sign("round-head", b"head", run="r14")
    forged = bytes(64)
    # whichever bytes are checked, the memo must hold those and no others
    with contextlib.suppress(SignatureError):
        shifty = _Shifty(forged, genuine)
        key.public_key.verify("round-head", b"head", shifty, run="r14")
    with pytest.raises(SignatureError):
        key.public_key.verify("round-head", b"head", forged, run="r14")


# -- the trainer: data poisoning with partial batches ---------------------------


def test_a_backdoor_clients_update_does_not_depend_on_its_chunk() -> None:
    # A Byzantine client of 5 samples: half of its batch is triggered, whether it
    # trains alone or beside a client of 32 samples (then the step is 32 wide and
    # round(0.5 * 32) = 16 >= 5: all five of its samples are triggered).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.rand(37, 1, 8, 8)
    y = torch.randint(1, 10, (37,))
    backdoor = data_transform(AttackConfig(name="backdoor", backdoor_fraction=0.5))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = BatchedTrainer(model, lr=0.1, batch_size=32, min_steps=1)
    small = ClientTask(torch.arange(0, 5), backdoor)
    alone = trainer.train(
        params, [small], x, y, generator=torch.Generator().manual_seed(1)
    )
    beside = trainer.train(
        params,
        [small, ClientTask(torch.arange(5, 37))],
        x,
        y,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.allclose(alone[0], beside[0], atol=1e-6)

"""protogalaxy up, small: every process real, the client runner verifying receipts."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from protogalaxy.config import load_config
from services.up import LocalCluster

pytestmark = pytest.mark.slow


def test_a_small_run_completes_with_a_consistent_audit_log(tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "clients.count": 6,
            "galaxies.count": 2,
            "clients.samples_per_client": 200,
            "training.rounds": 3,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
        }
    )
    cluster = LocalCluster(
        config, tmp_path, commit_deadline_s=120, reveal_deadline_s=120
    )
    try:
        cluster.start()
        heads = []
        deadline = time.monotonic() + 300
        while True:
            status = cluster.status()
            log = status["audit_log"]
            if not heads or heads[-1] != (log["size"], log["root"]):
                heads.append((log["size"], log["root"]))
            if status["finished"]:
                break
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(0.1)
        summary = cluster.summary(status, 0.0)
        runner = cluster.procs["clients"].popen
        assert (
            runner is not None and runner.wait(timeout=60) == 0
        )  # all receipts verified
        text = (tmp_path / "logs" / "clients.log").read_text()
        assert "took part in rounds [0, 1, 2]" in text
        metrics = httpx.get(cluster.galaxy_url(0) + "/metrics").text
        assert "protogalaxy_galaxy_rounds_completed_total 3.0" in metrics
        assert (
            "protogalaxy_galaxy_updates_accepted_total 9.0" in metrics
        )  # 3 clients x 3
    finally:
        cluster.stop()
    assert summary["rounds"] == 3 and status["audit_log"]["size"] == 3
    # The published audit-log size only ever grew, one signed head per round.
    sizes = [size for size, _ in heads]
    assert sizes == sorted(sizes) and sizes[-1] == 3


def test_up_reports_a_client_runner_that_stops_on_a_bad_proof(tmp_path: Path) -> None:
    """Clients pinning another key refuse the first receipt and exit 3 (a receipt
    failed verification); the run is reported failed at once, with the runner's
    log, not left to its deadlines."""
    from protogalaxy.crypto import SigningKey

    config = load_config(
        overrides={
            "clients.count": 3,
            "galaxies.count": 1,
            "clients.samples_per_client": 200,
            "training.rounds": 2,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
        }
    )
    cluster = LocalCluster(config, tmp_path, commit_deadline_s=600)
    try:
        cluster.start(clients=False)
        stranger = SigningKey.generate().public_key.to_bytes().hex()
        cluster.start_clients(pinned_key=stranger)
        with pytest.raises(RuntimeError, match="clients exited with 3") as failed:
            cluster.wait_finished(timeout=300)
    finally:
        cluster.stop()
    assert str(tmp_path / "logs" / "clients.log") in str(failed.value)
    log = (tmp_path / "logs" / "clients.log").read_text()
    assert "receipt that fails verification" in log

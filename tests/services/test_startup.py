"""A galaxy pod that starts before Redis or the global aggregator answers: it
listens at once (its startup and liveness probes pass, SIGTERM stops it), says
not ready, and becomes ready once both come up, with no restart."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from protogalaxy.config import load_config
from protogalaxy.services.up import LocalCluster


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def _until(what: str, check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(what)


def test_a_galaxy_listens_before_redis_and_the_global_answer(tmp_path: Path) -> None:
    cluster = LocalCluster(load_config(overrides={"training.rounds": 1}), tmp_path)
    plan = cluster.plan()
    galaxy = plan["galaxy-0"]
    try:
        galaxy.start()  # no Redis, no global aggregator yet
        url = cluster.galaxy_url(0)
        live = _until("the galaxy never answered /livez", lambda: _get(url + "/livez"))
        assert live.status_code == 200
        ready = _get(url + "/readyz")
        assert ready is not None and ready.status_code == 503, ready
        assert ready.json()["error"] == "not_ready"
        cluster.start_redis()
        plan["global"].start()
        _until(
            "the galaxy did not become ready once Redis and the global answered",
            lambda: (r := _get(url + "/readyz")) is not None and r.status_code == 200,
            timeout=120,
        )
        assert galaxy.alive()  # the same process: it never had to restart
    finally:
        cluster.stop()


def test_a_waiting_galaxy_stops_on_sigterm(tmp_path: Path) -> None:
    cluster = LocalCluster(load_config(overrides={"training.rounds": 1}), tmp_path)
    galaxy = cluster.plan()["galaxy-0"]
    try:
        galaxy.start()
        url = cluster.galaxy_url(0)
        _until("the galaxy never answered /livez", lambda: _get(url + "/livez"))
        galaxy.send(signal.SIGTERM)
        _until("the galaxy ignored SIGTERM", lambda: not galaxy.alive(), timeout=20)
    finally:
        cluster.stop()


def test_the_global_aggregator_keeps_only_the_newest_previous_runs(
    tmp_path: Path,
) -> None:
    import os

    from protogalaxy.services.global_app import prune_previous_runs

    volume = tmp_path / "data"
    for i, name in enumerate(["r-old", "r-mid", "r-new"]):
        (volume / name / "checkpoints").mkdir(parents=True)
        os.utime(volume / name, (1000 + i, 1000 + i))
    (volume / "lost+found").mkdir()
    (volume / "notes.txt").write_text("mine")
    current = volume / "r-now"
    current.mkdir()
    gone = prune_previous_runs(current, keep=1)
    assert [d.name for d in gone] == ["r-mid", "r-old"]
    left = sorted(p.name for p in volume.iterdir())
    assert left == ["lost+found", "notes.txt", "r-new", "r-now"]


def test_a_galaxy_redis_refuses_exits_with_the_reason(tmp_path: Path) -> None:
    """Wrong credentials do not heal by waiting: the galaxy exits non-zero with
    the reason in its log (the pod restarts visibly), not not-ready forever."""
    cluster = LocalCluster(load_config(overrides={"training.rounds": 1}), tmp_path)
    galaxy = cluster.plan()["galaxy-0"]
    try:
        cluster.start_redis()
        galaxy.env["PG_REDIS_URL"] = cluster.redis_url.replace(
            cluster.redis_password, "not-the-password"
        )
        galaxy.start()
        _until("the galaxy kept running", lambda: not galaxy.alive(), timeout=60)
        assert galaxy.popen is not None and galaxy.popen.returncode == 3
        log = (tmp_path / "logs" / "galaxy-0.log").read_text()
        assert '"event": "galaxy_start_failed"' in log
        assert "AuthenticationError" in log
    finally:
        cluster.stop()


def test_secrets_can_come_from_files(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from protogalaxy.services.common import env

    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    monkeypatch.delenv("PG_X_TOKEN", raising=False)
    monkeypatch.setenv("PG_X_TOKEN_FILE", str(secret))
    assert env("PG_X_TOKEN") == "s3cret"
    monkeypatch.setenv("PG_X_TOKEN", "direct")  # the variable wins
    assert env("PG_X_TOKEN") == "direct"
    monkeypatch.delenv("PG_X_TOKEN")
    monkeypatch.setenv("PG_X_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="PG_X_TOKEN_FILE"):
        env("PG_X_TOKEN")


def test_a_galaxy_waits_out_a_full_redis(tmp_path: Path) -> None:
    """OOM (noeviction), like BUSY or LOADING, heals: the galaxy waits, not
    exits (a neighbour filling Redis must not be able to crash-loop it)."""
    cluster = LocalCluster(load_config(overrides={"training.rounds": 1}), tmp_path)
    plan = cluster.plan()
    galaxy = plan["galaxy-0"]
    try:
        cluster.start_redis()
        admin = cluster.redis_client()
        for i in range(16):
            admin.set(f"someone-else:{i}", b"x" * (256 * 1024))
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used - 1024 * 1024)
        plan["global"].start()
        galaxy.start()
        url = cluster.galaxy_url(0)
        _until("the galaxy never answered /livez", lambda: _get(url + "/livez"))
        log = tmp_path / "logs" / "galaxy-0.log"
        _until("the galaxy never met the full Redis",
               lambda: "OutOfMemoryError" in log.read_text())  # fmt: skip
        assert galaxy.alive()
        ready = _get(url + "/readyz")
        assert ready is not None and ready.status_code == 503
        admin.config_set("maxmemory", 0)
        _until(
            "the galaxy did not open its run once Redis had room",
            lambda: (r := _get(url + "/readyz")) is not None and r.status_code == 200,
            timeout=120,
        )
        assert galaxy.alive()
    finally:
        cluster.stop()


def test_a_galaxy_restarted_after_the_run_ended_becomes_ready(tmp_path: Path) -> None:
    """A rollout of the galaxies after a finished run (an upgrade of their log
    level, a node drain) waits for them to be ready: the rendered-chart driver
    found they never were (no model once the run was over)."""
    config = load_config(
        overrides={"training.rounds": 1, "clients.samples_per_client": 100}
    )
    cluster = LocalCluster(config, tmp_path)
    try:
        cluster.start()
        cluster.wait_finished(timeout=600)
        cluster.kill("galaxy-0")
        cluster.restart("galaxy-0")
        cluster.wait_ready(cluster.galaxy_url(0), "/readyz", timeout=60)
    finally:
        cluster.stop()

"""protogalaxy up, small: every process real, the client runner verifying receipts."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from protogalaxy.config import load_config
from protogalaxy.services.up import LocalCluster

pytestmark = pytest.mark.slow


DASHBOARD = Path(__file__).parents[2] / "charts" / "dashboards" / "protogalaxy.json"


def dashboard_metrics() -> set[str]:
    """Every metric name in the dashboard's queries (and its variables')."""
    import json
    import re

    text = json.dumps(json.loads(DASHBOARD.read_text()))
    return set(re.findall(r"\bprotogalaxy_[a-z_]+", text))


def exported_names(text: str) -> set[str]:
    """Every name a query may use for the families in a /metrics exposition:
    samples' names, and a counter's ``_total`` name even before it has a sample."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(s.name for s in family.samples)
    return names


def test_dashboard_metric_check_catches_a_misspelt_query() -> None:
    text = "# HELP protogalaxy_x_total x\n# TYPE protogalaxy_x_total counter\n"
    assert exported_names(text) >= {"protogalaxy_x_total"}
    assert "protogalaxy_x_totl" not in exported_names(text)
    assert {"protogalaxy_global_accuracy_ratio"} <= dashboard_metrics()


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
        global_metrics = httpx.get(cluster.global_url + "/metrics").text
        exported = metrics + global_metrics
        assert "protogalaxy_global_last_round 2.0" in global_metrics
        assert "protogalaxy_galaxy_rounds_completed_total 3.0" in metrics
        assert (
            "protogalaxy_galaxy_updates_accepted_total 9.0" in metrics
        )  # 3 clients x 3
    finally:
        cluster.stop()
    assert summary["rounds"] == 3 and status["audit_log"]["size"] == 3
    # The chart's Grafana dashboard queries only metrics the services export.
    missing = dashboard_metrics() - exported_names(exported)
    assert not missing, f"the dashboard queries metrics no service exports: {missing}"
    # up writes the per-round table and plot that simulate writes
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,accuracy,loss") and len(rows) == 4
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    # The published audit-log size only ever grew, one signed head per round.
    sizes = [size for size, _ in heads]
    assert sizes == sorted(sizes) and sizes[-1] == 3


def test_up_reports_a_client_runner_that_stops_on_a_bad_proof(tmp_path: Path) -> None:
    """Clients pinning another key refuse the first model (and would refuse the
    first receipt) and exit 3; the run is reported failed at once, with the
    runner's log, not left to its deadlines."""
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
        services = [p.popen.pid for p in cluster.procs.values() if p.popen]
        stranger = SigningKey.generate().public_key.to_bytes().hex()
        cluster.start_clients(pinned_key=stranger)
        with pytest.raises(RuntimeError, match="clients exited with 3") as failed:
            cluster.wait_finished(timeout=300)
    finally:
        cluster.stop()
    # Starting the clients later left the services in the cluster's hands: stop()
    # ended every one of them (no orphans holding ports and memory).
    assert len(services) == 3
    for pid in services:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in (
            Path(f"/proc/{pid}/status").read_text().lower()
        ), pid
    assert str(tmp_path / "logs" / "clients.log") in str(failed.value)
    log = (tmp_path / "logs" / "clients.log").read_text()
    # The first thing it checks against the pinned key (the signed placement of
    # the clients) fails, and it says so.
    assert "against the pinned global key" in log


def test_client_processes_hold_no_service_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client runner gets the clients' seed and the public key it pins, no
    bearer token (not even one left in the caller's environment); each aggregator
    gets its own private key and no other."""
    monkeypatch.setenv("PG_SERVICE_TOKEN", "leaked-from-the-shell")
    monkeypatch.setenv("PG_ENROLLMENT_TOKEN", "leaked-from-the-shell")
    cluster = LocalCluster(load_config(overrides={"galaxies.count": 2}), tmp_path)
    procs = cluster.plan()
    clients = procs["clients"].env
    assert not [k for k in clients if k.startswith("PG_") and "TOKEN" in k], clients
    assert clients["PG_CLIENT_SEED_FILE"] == str(cluster.keys / "clients.seed")
    assert clients["PG_GLOBAL_PUBLIC_KEY"] == cluster.global_public_key
    named = {v for v in clients.values() if v.startswith(str(cluster.keys))}
    # Its only private file is the seed; it pins the galaxies' public keys.
    assert named == {
        str(cluster.keys / "clients.seed"),
        str(cluster.keys / "galaxies.pub"),
    }
    for g in (0, 1):
        env = procs[f"galaxy-{g}"].env
        assert env["PG_SERVICE_TOKEN"] == cluster.service_token
        assert env["PG_SIGNING_KEY_FILE"] == str(cluster.keys / f"galaxy-{g}.key")
        assert env["PG_GLOBAL_PUBLIC_KEY"] == cluster.global_public_key
    assert procs["global"].env["PG_SIGNING_KEY_FILE"] == str(
        cluster.keys / "global.key"
    )
    modes = {p.name: p.stat().st_mode & 0o777 for p in cluster.keys.iterdir()}
    private = [n for n in modes if not n.endswith(".pub")]
    assert private and all(modes[n] == 0o600 for n in private), modes


def test_a_restarted_client_runner_rejoins_with_the_same_keys(tmp_path: Path) -> None:
    """A client pod killed mid-run and started again derives the same keys from the
    provisioned seed, registers again and its later updates are aggregated (before,
    it made fresh keys, was refused and crash-looped)."""
    config = load_config(
        overrides={
            "clients.count": 4,
            "galaxies.count": 2,
            "clients.samples_per_client": 100,
            "training.rounds": 4,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
            "defense.layers": [1, 4],
            "defense.aggregator": "fedavg",
        }
    )
    cluster = LocalCluster(
        config, tmp_path, commit_deadline_s=20, reveal_deadline_s=20, evaluate=False
    )
    try:
        cluster.start()
        deadline = time.monotonic() + 240
        while cluster.status()["round"] < 1:
            assert time.monotonic() < deadline, "round 0 did not complete"
            time.sleep(0.2)
        cluster.kill("clients")  # SIGKILL, as a node loss would
        cluster.procs["clients"].start()  # same id range, same seed
        status = cluster.wait_finished(timeout=300)
        runner = cluster.procs["clients"].popen
        assert runner is not None and runner.wait(timeout=60) == 0
        states = [
            httpx.get(
                cluster.galaxy_url(config.galaxy_of(c)) + f"/v1/clients/{c}"
            ).json()
            for c in range(4)
        ]
    finally:
        cluster.stop()
    assert status["finished"] and len(status["history"]) == 4
    log = (tmp_path / "logs" / "clients.log").read_text()
    assert "registration refused" not in log
    for state in states:
        # aggregated in round 3, after the restart, and in at least one more
        assert state["last_round"] == 3, state
        assert state["clean_rounds"] >= 2 and state["status"] == "active", state


def test_a_sampled_run_plays_exactly_each_rounds_sample(tmp_path: Path) -> None:
    """clients.fraction_fit over real processes: the runner plays only the
    sampled clients, the galaxies close each phase on the sample alone (long
    before their deadlines), and the audit finds nothing wrong."""
    import json

    config = load_config(
        overrides={
            "clients.count": 12,
            "galaxies.count": 2,
            "clients.samples_per_client": 100,
            "clients.fraction_fit": 0.5,
            "training.rounds": 2,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
        }
    )
    cluster = LocalCluster(
        config, tmp_path, commit_deadline_s=600, reveal_deadline_s=600
    )
    try:
        cluster.start()
        status = cluster.wait_finished(timeout=300)
    finally:
        cluster.stop()
    assert status["isolated"] == []
    played: dict[int, set[int]] = {}
    for line in (tmp_path / "receipts.jsonl").read_text().splitlines():
        rec = json.loads(line)
        played.setdefault(rec["round"], set()).add(rec["client"])
    sampling = config.sampling()
    for rnd in (0, 1):
        want = set().union(
            *(sampling.clients(m, rnd, g) for g, m in config.galaxy_members().items())
        )
        assert played[rnd] == want and len(want) == 6, (rnd, played)


def test_up_keep_running_leaves_the_services_up_until_ctrl_c(tmp_path: Path) -> None:
    """``protogalaxy up --keep-running``: after the run its services answer (the
    finished status, the audit log) at the URLs it prints, with the global key it
    prints, until SIGINT stops them all."""
    import re
    import signal
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "clients": {"count": 6, "samples_per_client": 50},
                "galaxies": {"count": 2},
                "byzantine": {"fraction": 0.0},
                "defense": {"byzantine_fraction": 0.0},
                "training": {"rounds": 1},
            }
        )
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "protogalaxy.cli", "up", "--config", str(config),
         "--out", str(out), "--keep-running", "--deadline", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while not any("global public key" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        url = re.search(r"global aggregator (http://\S+)", text)
        key = re.search(r"global public key ([0-9a-f]{64})", text)
        assert url and key, text
        status = httpx.get(url.group(1) + "/v1/status").json()
        assert status["finished"] is True
        assert httpx.get(url.group(1) + "/v1/identity").json()["public_key"] == (
            key.group(1)
        )
        token = (out / "secrets" / "auditor.token").read_text().strip()
        assert (out / "secrets" / "auditor.token").stat().st_mode & 0o077 == 0
        files = httpx.get(
            url.group(1) + "/v1/audit/files",
            headers={"authorization": f"Bearer {token}"},
        )
        assert files.status_code == 200 and files.json()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.group(1) + "/v1/status", timeout=2)
    finally:
        proc.kill()

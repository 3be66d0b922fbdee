"""What users do with ProtoGalaxy on a cluster, through one driver interface.

With the rendered driver these run the chart's own objects as processes, so a
wiring bug of the chart (a Job that never runs some clients, a value every pod
refuses, an env var the app misreads) fails here, on every change."""

from __future__ import annotations

from typing import Any

import pytest
from drivers import Driver, run_config

from protogalaxy.simulation import choose_byzantine


def finished(status: dict[str, Any]) -> bool:
    return bool(status["finished"]) and status.get("evaluating", 0) == 0


def assert_all_took_part(driver: Driver, clients: int, *, since_round: int = 0) -> None:
    """Every one of ``clients`` committed in a round ``>= since_round``."""
    seen = driver.client_ids_seen(since_round=since_round)
    missing = sorted(set(range(clients)) - seen)
    assert not missing, (
        f"{len(missing)} of {clients} clients never took part in a round "
        f">= {since_round}: {missing}"
    )


def test_a_run_completes_and_quarantines_exactly_the_byzantine_clients(
    driver: Driver,
) -> None:
    driver.install({})
    assert driver.check_install()  # helm test: the global answers, galaxies ready
    status = driver.wait(finished, 900, "the run did not finish")
    config = run_config({})
    # Every client took part: each one's signed commitment is in a galaxy's
    # published transcript (a client pod that never ran leaves its clients out).
    assert_all_took_part(driver, config.clients.count)
    assert status["rounds"] == config.training.rounds
    assert [r["round"] for r in status["history"]] == list(range(status["rounds"]))
    assert status["audit_log"]["size"] == config.training.rounds
    assert status["history"][-1]["accuracy"] >= 0.9
    # `kubectl logs` of the galaxies: quarantine events name every Byzantine
    # client and no honest one, each with its evidence.
    events = [
        e for e in driver.galaxy_log_events() if e.get("event") == "client_quarantined"
    ]
    byzantine = set(choose_byzantine(config))
    assert {e["client"] for e in events} == byzantine
    for e in events:
        assert e["galaxy"] == config.galaxy_of(e["client"])
        assert e["reasons"] and e["evidence"]


def test_scaling_to_five_galaxies_starts_a_clean_run(driver: Driver) -> None:
    # 50 clients at 20% Byzantine: Multi-Krum holds in 3 galaxies and in 5.
    run = {
        "clients.count": 50,
        "clients.samples_per_client": 1000,  # 50 x 1000 of MNIST's 60,000
        "byzantine.fraction": 0.2,
        "training.rounds": 2,
    }
    driver.install(run)
    first = driver.wait(finished, 600, "the first run did not finish")
    assert [r["galaxies"] for r in first["history"]] == [[0, 1, 2]] * 2, first
    driver.upgrade({**run, "galaxies.count": 5})
    assert driver.ready_galaxies() == 5
    status = driver.wait(finished, 600, "the run on five galaxies did not finish")
    # A new run from round 0, on five galaxies, with nothing of the old one: its
    # own audit log (two heads, not four) and every client in its transcripts.
    assert [r["round"] for r in status["history"]] == [0, 1], status
    assert [r["galaxies"] for r in status["history"]] == [[0, 1, 2, 3, 4]] * 2, status
    assert status["audit_log"]["size"] == 2, status
    assert_all_took_part(driver, 50)


def test_ten_galaxies_of_a_hundred_clients_complete(driver: Driver) -> None:
    """The chart's ten-galaxy shape (charts/ci/galaxies-10-values.yaml): every
    one of the 100 clients takes part; a Job that runs fewer client pods at once
    than it has leaves the later pods' clients out of the whole run."""
    run = {
        "galaxies.count": 10,
        "clients.count": 100,
        "clients.samples_per_client": 100,  # cheap: what is checked is the wiring
        "training.rounds": 2,
    }
    driver.install(run)
    status = driver.wait(finished, 900, "the run on ten galaxies did not finish")
    assert [r["round"] for r in status["history"]] == [0, 1], status
    assert [r["galaxies"] for r in status["history"]] == [list(range(10))] * 2
    assert_all_took_part(driver, 100)


def test_a_restarted_client_pod_rejoins(driver: Driver) -> None:
    """Kill the first client pod mid-run: the Job starts it again, its clients
    register again with the same keys and take part in the rounds after."""
    run = {
        "training.rounds": 4,
        "clients.samples_per_client": 500,
        # Nobody is quarantined: every client is expected in every round.
        "byzantine.fraction": 0.0,
        "defense.byzantine_fraction": 0.0,
    }
    driver.install(run)
    status = driver.wait(lambda s: s["round"] >= 1, 600, "round 1 did not start")
    killed_in = status["round"]
    try:
        driver.restart_client_pod(0)
    except NotImplementedError as exc:
        pytest.skip(f"{driver.name}: {exc}")
    status = driver.wait(finished, 900, "the run did not finish after the restart")
    assert [r["round"] for r in status["history"]] == [0, 1, 2, 3], status
    assert killed_in < 3, f"the kill came too late to see a later round ({status})"
    assert_all_took_part(
        driver, run_config(run).clients.count, since_round=killed_in + 1
    )


def test_the_global_aggregator_resumes_from_its_checkpoint(driver: Driver) -> None:
    driver.install({"training.rounds": 4})
    driver.wait(lambda s: s["round"] >= 2, 600, "round 2 did not start")
    driver.restart_global()
    status = driver.wait(finished, 600, "the run did not finish after the restart")
    # Resumed, not restarted: four rounds in the audit log, none applied twice.
    assert status["audit_log"]["size"] == 4
    assert status["round"] == 4
    # The history resumed with the checkpoint: every round, once.
    assert [r["round"] for r in status["history"]] == [0, 1, 2, 3], status


def test_a_compromised_galaxy_is_isolated_and_the_run_audits(driver: Driver) -> None:
    """Galaxy 1 drops honest clients after acknowledging them from round 1: the
    global aggregator's replay audit catches it that round, isolates it, moves its
    clients, and the run's artefacts verify with `protogalaxy audit`."""
    driver.install(
        {
            "training.rounds": 3,
            "galaxy_attack.galaxy": 1,
            "galaxy_attack.kind": "drop",
            "galaxy_attack.from_round": 1,
        }
    )
    status = driver.wait(finished, 900, "the run did not finish")
    assert status["isolated"] == [1], status
    assert [h.get("misbehaved", {}) for h in status["history"]][1] == {
        "1": "dropped_after_ack"
    }, status
    assert status["history"][-1]["galaxies"] == [0, 2], status
    code, out = driver.audit()
    assert code == 0, out
    assert "galaxy 1 misbehaved" in out, out

"""What users do with ProtoGalaxy on a cluster, through one driver interface."""

from __future__ import annotations

from typing import Any

from drivers import Driver, run_config

from protogalaxy.simulation import choose_byzantine


def finished(status: dict[str, Any]) -> bool:
    return bool(status["finished"]) and status.get("evaluating", 0) == 0


def test_a_run_completes_and_quarantines_exactly_the_byzantine_clients(
    driver: Driver,
) -> None:
    driver.install({})
    assert driver.check_install()  # helm test: the global answers, galaxies ready
    status = driver.wait(finished, 900, "the run did not finish")
    config = run_config({})
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


def test_scaling_to_five_galaxies_is_used_by_the_next_run(driver: Driver) -> None:
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
    assert [r["galaxies"] for r in status["history"]] == [[0, 1, 2, 3, 4]] * 2, status


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

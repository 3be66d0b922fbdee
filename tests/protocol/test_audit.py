"""Replay audits catch a compromised galaxy the round it starts lying, with the
proof; its clients move on with the reputations of the last verified round; and
nothing is caught when the audit is off."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from protogalaxy.artefacts import ArtefactWriter
from protogalaxy.config import load_config
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.statements import (
    Acknowledgement,
    SignedDocument,
    sign_statement,
)
from protogalaxy.defense.pipeline import TOLERANCE, ReplayMismatch, _replay_tests
from protogalaxy.learning.datasets import Dataset, load_dataset
from protogalaxy.protocol.compromised import GALAXY_ATTACKS
from protogalaxy.protocol.galaxy import Rejected
from protogalaxy.simulation import Simulation

SMALL = {
    "training.rounds": 3,
    "clients.samples_per_client": 200,
    "galaxy_attack.from_round": 1,
}

#: what the audit names each attack as (the first contradiction it finds)
EXPECTED = {
    "modify": {"false_decision", "aggregate_mismatch"},
    "drop": {"dropped_after_ack"},
    "frame_rejection": {"dropped_after_ack", "false_rejection"},
    "frame_statistics": {"false_decision"},
    "inflate_weight": {"weight_mismatch"},
    "inconsistent_aggregate": {"aggregate_mismatch"},
    "withhold_transcript": {"missing_transcript"},
}


@functools.cache
def mnist() -> Dataset:
    return load_dataset("mnist")


def simulate(tmp: Path | None = None, **overrides: Any) -> Simulation:
    config = load_config(overrides={**SMALL, **overrides})
    writer = None if tmp is None else ArtefactWriter(tmp)
    sim = Simulation(config, dataset=mnist(), artefacts=writer)
    sim.result = sim.run()  # type: ignore[attr-defined]
    return sim


def test_an_honest_run_passes_every_audit() -> None:
    sim = simulate()
    g = sim.result.summary()["galaxies"]  # type: ignore[attr-defined]
    assert g["isolated"] == {} and g["false_attributions"] == 0
    record = sim.global_agg.audit_log.entry(-1)
    statuses = {v["audit"] for v in record.body["galaxies"].values()}
    assert statuses == {"replayed"}
    # The replay ended with exactly the state each galaxy published.
    for gid, galaxy in sim.galaxies.items():
        published = galaxy.transcript(2)
        assert published is not None
        assert sim.global_agg.verified_state[gid] == published[2]


@pytest.mark.parametrize("kind", GALAXY_ATTACKS)
def test_each_galaxy_attack_is_caught_the_round_it_starts(kind: str) -> None:
    sim = simulate(**{"galaxy_attack.galaxy": 1, "galaxy_attack.kind": kind})
    g = sim.result.summary()["galaxies"]  # type: ignore[attr-defined]
    assert g["isolated"] == {"1": 1}, g
    assert g["misbehaviour"]["1"] in EXPECTED[kind], g
    assert g["false_isolations"] == [] and g["false_attributions"] == 0
    assert g["detection_rate"] == 1.0
    # Its clients moved to galaxies 0 and 2, and trained on.
    assignment = sim.global_agg.assignment
    moved = [c for c in range(30) if c % 3 == 1]
    assert {assignment.galaxy_of(c) for c in moved} == {0, 2}
    for c in moved:
        galaxy = sim.galaxy_of(c)
        assert galaxy.store.client_key(c) is not None  # registered there
        assert galaxy.defense.tracker.record(c).last_round == 2
    # The round 1 record names the misbehaviour, round 2 the isolation.
    log = sim.global_agg.audit_log
    assert log.entry(1).body["galaxies"]["1"]["status"] == "misbehaved"
    assert log.entry(2).body["galaxies"]["1"]["status"] == "isolated"
    assert log.entry(2).body["isolated"] == [1]


def test_moved_clients_keep_the_reputation_of_the_last_verified_round() -> None:
    """No honest client's reputation changes because of a galaxy's lie: a framed
    client arrives at its new galaxy with the record it had before the lie."""
    sim = simulate(
        **{
            "galaxy_attack.galaxy": 1,
            "galaxy_attack.kind": "frame_statistics",
            "training.rounds": 2,
        }
    )
    liar = sim.galaxies[1]
    victims = liar.victims[1]  # type: ignore[attr-defined]
    assert victims
    verified = sim.global_agg.verified_state[1]["clients"]
    for c in victims:
        lied = liar.defense.tracker.record(c)
        adopted = sim.galaxy_of(c).defense.tracker.record(c)
        assert adopted.reputation == verified[str(c)]["reputation"]
        assert adopted.reputation > lied.reputation  # the lie cost it, there only


@pytest.mark.parametrize("kind", ["frame_statistics", "drop", "modify"])
def test_without_the_audit_nothing_is_caught(kind: str) -> None:
    sim = simulate(
        **{
            "galaxy_attack.galaxy": 1,
            "galaxy_attack.kind": kind,
            "audit.enabled": False,
        }
    )
    g = sim.result.summary()["galaxies"]  # type: ignore[attr-defined]
    assert g["isolated"] == {} and g["detection_rate"] == 0.0
    if kind != "modify":
        assert g["false_attributions"] > 0


def test_a_forged_acknowledgement_is_refused() -> None:
    sim = Simulation(load_config(overrides=SMALL), dataset=mnist())
    forged = sign_statement(
        SigningKey.generate(),
        Acknowledgement(0, 1, 4, bytes(68), bytes(32)),
        run=sim.run_id,
    )
    with pytest.raises(Rejected, match="bad_signature"):
        sim.global_agg.submit_ack(forged)


def test_layer2_decisions_near_a_threshold_stand_within_the_tolerance() -> None:
    decisions = {
        "norm": (3.0 + TOLERANCE, 3.0, True),  # fails, but within tolerance
        "direction": (0.9, 0.5, False),  # clearly passes
    }
    # Published as passed: the value is within tolerance of the threshold.
    assert _replay_tests(7, decisions, frozenset()) == []
    # Published as failed, which it is: fine too.
    assert _replay_tests(7, decisions, frozenset({"norm"})) == ["norm"]
    with pytest.raises(ReplayMismatch, match="direction"):
        _replay_tests(7, decisions, frozenset({"direction"}))
    far = {"norm": (3.5, 3.0, True)}
    with pytest.raises(ReplayMismatch, match="norm"):
        _replay_tests(7, far, frozenset())


def test_the_artefacts_hold_no_private_key(tmp_path: Path) -> None:
    sim = simulate(tmp_path, **{"training.rounds": 2})
    secrets = [
        sim.global_key.to_bytes(),
        *[g.key.to_bytes() for g in sim.galaxies.values()],
        *[k.to_bytes() for k in sim.client_keys.values()],
    ]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret not in data and secret.hex().encode() not in data, path
    record = SignedDocument.from_bytes(
        sim.global_agg.audit_log.entry(0).to_bytes(), kind="round-record"
    )
    record.verify(sim.global_key.public_key, run=sim.run_id)

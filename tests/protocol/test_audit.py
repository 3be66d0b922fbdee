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


def _twisted(twist: str) -> type:
    """A galaxy whose only lie, from round 1, is a malformed signed transcript:
    what the audit must call misbehaviour instead of crashing on or accepting."""
    import json

    from protogalaxy.crypto.identity import reveal_digest
    from protogalaxy.protocol.compromised import CompromisedGalaxy
    from protogalaxy.protocol.galaxy import Rejected
    from protogalaxy.protocol.transcript import digest_hex

    class Twisted(CompromisedGalaxy):
        def lying(self, round: int) -> bool:
            return False  # none of the built-in attacks: only the twist

        def submit_reveal(self, round: int, client: int, body: Any, nonce: bytes,
                          signature: bytes, **kw: Any) -> Any:  # fmt: skip
            tree = self._tree(round)
            if (
                twist == "null_reason"
                and round >= 1
                and tree is not None
                and (client == min(tree.client_ids))
            ):
                # Refuse a valid reveal (422, so no acknowledgement) and record it
                # as a layer-1 rejection with no reason, the client's own signed
                # reveal attached: evidence that looks like a real rejection.
                com = tree.commitment_of(client)
                record = {
                    "reason": None,
                    "nonce": bytes(nonce).hex(),
                    "digest": reveal_digest(com, body, nonce).hex(),
                    "signature": bytes(signature).hex(),
                }
                self.store.add_rejection(round, client, json.dumps(record))
                self.store.put_blob(round, f"rejected:{client}", bytes(body))
                self._note(round, [client])
                raise Rejected("shape", "framed")
            return super().submit_reveal(round, client, body, nonce, signature, **kw)

        def _transcript_body(self, round: int, *args: Any) -> dict[str, Any]:
            body = super()._transcript_body(round, *args)
            if round < 1:
                return body
            if twist == "weight_text":
                for e in body["clients"]:
                    if e["fate"] == "aggregated":
                        e["weight"] = "x"
                        break
            if twist == "state_list":
                body["reputation_after"] = digest_hex(["not", "a", "state"])
            if twist == "state_fields":
                self._extra = {"galaxy": self.galaxy, "clients": {"1": {"x": 1}}}
                body["reputation_after"] = digest_hex(self._extra)
            return body

        def transcript(self, round: int) -> Any:
            published = super().transcript(round)
            if published is not None and round >= 1 and twist == "state_list":
                return published[0], published[1], ["not", "a", "state"]
            if published is not None and round >= 1 and twist == "state_fields":
                return published[0], published[1], self._extra
            return published

    return Twisted


@pytest.mark.parametrize(
    ("twist", "kind"),
    [
        ("null_reason", "transcript_mismatch"),
        ("weight_text", "transcript_mismatch"),
        ("state_list", "malformed_transcript"),
        ("state_fields", "malformed_transcript"),
    ],
)
def test_a_malformed_transcript_is_misbehaviour_not_a_stuck_round(
    twist: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A galaxy signs a transcript the replay cannot read (a rejection with no
    checkable reason, a weight that is not a number, a reputation state that is
    not one): the round completes, the galaxy is isolated that round, no honest
    client's reputation falls. (Before, the audit raised KeyError or ValueError
    and the global aggregator retried the round forever; a null reason even passed
    the replay and framed a client.)"""
    import protogalaxy.simulation as simulation

    monkeypatch.setattr(simulation, "CompromisedGalaxy", _twisted(twist))
    sim = simulate(
        **{"galaxy_attack.galaxy": 1, "galaxy_attack.kind": "frame_rejection"}
    )
    g = sim.result.summary()["galaxies"]  # type: ignore[attr-defined]
    assert g["isolated"] == {"1": 1}, g
    assert g["misbehaviour"]["1"] == kind, g
    assert g["false_attributions"] == 0
    assert sim.global_agg.round == 3  # every round completed


def test_a_transcript_sent_after_the_draw_counts_as_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A galaxy that modifies updates holds its transcript back until the audit
    has drawn its sample, so it would only be checked, never replayed: the global
    aggregator refuses a transcript after the draw, and the galaxy is caught as
    having none."""
    import protogalaxy.simulation as simulation
    from protogalaxy.protocol.compromised import CompromisedGalaxy
    from protogalaxy.protocol.galaxy import WrongPhase
    from protogalaxy.protocol.global_aggregator import GlobalAggregator

    held: dict[int, Any] = {}

    class Late(CompromisedGalaxy):
        def transcript(self, round: int) -> Any:
            published = super().transcript(round)
            if self.lying(round) and round not in held:
                held[round] = published
                return None
            return published

    draw = GlobalAggregator.audit_targets
    refused: list[int] = []

    def audit_targets(self: GlobalAggregator, round: int) -> Any:
        out = draw(self, round)
        if held.get(round) is not None:
            try:
                self.submit_transcript(*held[round])
            except WrongPhase:
                refused.append(round)
        return out

    monkeypatch.setattr(simulation, "CompromisedGalaxy", Late)
    monkeypatch.setattr(GlobalAggregator, "audit_targets", audit_targets)
    sim = simulate(**{"galaxy_attack.galaxy": 1, "galaxy_attack.kind": "modify"})
    g = sim.result.summary()["galaxies"]  # type: ignore[attr-defined]
    assert refused == [1]
    assert g["isolated"] == {"1": 1} and g["misbehaviour"]["1"] == "missing_transcript"
    assert g["false_attributions"] == 0


def test_the_last_galaxy_left_is_never_isolated() -> None:
    """Its misbehaviour is on record and its contribution excluded, round after
    round, but the run goes on (before, isolating it raised inside the round and
    the global aggregator retried that round forever)."""
    sim = simulate(
        **{
            "galaxies.count": 1,
            "clients.count": 10,
            "byzantine.fraction": 0.0,
            "galaxy_attack.galaxy": 0,
            "galaxy_attack.kind": "inflate_weight",
        }
    )
    assert sim.global_agg.round == 3 and sim.global_agg.isolated == {}
    statuses = [
        sim.global_agg.audit_log.entry(r).body["galaxies"]["0"]["status"]
        for r in range(3)
    ]
    assert statuses == ["aggregated", "misbehaved", "misbehaved"]


def test_an_unreachable_galaxy_is_left_out_not_isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Galaxy 1 cannot be asked for its updates in round 1 (a restart, a network
    fault): that is no proof of misbehaviour, so it is not isolated; but its
    aggregate was not verified, so round 1 goes on without it (``unaudited``),
    its transcript still checked, and the run passes the offline audit."""
    from protogalaxy.auditor import audit_run
    from protogalaxy.protocol.global_aggregator import GlobalAggregator

    finish = GlobalAggregator.finish_round

    def cut_off(self: GlobalAggregator, round: int, **kwargs: Any) -> Any:
        if round == 1:
            kwargs["unreachable"] = {1}
            kwargs["updates"] = {
                g: u for g, u in (kwargs.get("updates") or {}).items() if g != 1
            }
        return finish(self, round, **kwargs)

    monkeypatch.setattr(GlobalAggregator, "finish_round", cut_off)
    sim = simulate(tmp_path)
    g = sim.result.summary()["galaxies"]  # type: ignore[attr-defined]
    assert g["isolated"] == {} and g["false_attributions"] == 0
    records = [sim.global_agg.audit_log.entry(r).body["galaxies"] for r in range(3)]
    assert records[1]["1"]["status"] == "unaudited"
    assert records[1]["1"]["audit"] == "unreachable"
    assert {v["status"] for v in records[2].values()} <= {"aggregated", "clipped"}
    assert audit_run(tmp_path, out=lambda line: None) == 0

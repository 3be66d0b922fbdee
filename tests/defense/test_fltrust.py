"""FLTrust (issue 16): trust is the cosine with the server's root-data update, an
update counts by its direction only, and a galaxy cannot publish other weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from protogalaxy.artefacts import ArtefactWriter
from protogalaxy.auditor import audit_run
from protogalaxy.codec import decode_update, encode_update
from protogalaxy.config import load_config
from protogalaxy.crypto.errors import VerificationError
from protogalaxy.crypto.statements import SignedDocument, sign_document
from protogalaxy.defense.pipeline import (
    DefenseConfig,
    GalaxyDefense,
    GalaxyDefenseReport,
    ReplayHints,
    ReplayMismatch,
)
from protogalaxy.defense.robust import fltrust, get_aggregator
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.simulation import Simulation

D = 2_000


def _galaxy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    server = torch.randn(D, generator=g)
    honest = server + 0.8 * torch.randn(7, D, generator=g)
    return honest, server


def test_opposed_updates_get_no_trust_and_size_buys_nothing() -> None:
    honest, server = _galaxy()
    flipped = -4 * honest[:2]
    scaled = 50 * honest[2:3]
    x = torch.cat([honest, flipped, scaled])
    r = fltrust(x, server_update=server)
    assert r.selected is not None and r.weights is not None and r.trust is not None
    assert r.selected.tolist() == [True] * 7 + [False] * 2 + [True]
    assert r.weights[7:9] == (0, 0)
    # FLTrust for every row at least as long as the server's update:
    # |g0| sum_i TS_i x_i/|x_i| min(1, |x_i|/|g0|) / sum_i TS_i
    norms = x.double().norm(dim=1)
    unit = x.double() / norms.unsqueeze(1)
    g0 = float(server.double().norm())
    ts = (unit @ server.double() / g0).clamp(min=0)
    want = g0 * (ts * (norms / g0).clamp(max=1)) @ unit / ts.sum()
    assert torch.allclose(r.aggregate.double(), want, rtol=1e-4, atol=1e-6)
    # a 50x copy of an honest update pulls the direction no more than the update
    # itself does, and grows the norm by at most sum(TS) / sum(TS of the others)
    alone = fltrust(torch.cat([honest, honest[2:3]]), server_update=server)
    cos = torch.nn.functional.cosine_similarity(alone.aggregate, r.aggregate, dim=0)
    assert float(cos) > 1 - 1e-6
    ratio = float(r.aggregate.norm() / alone.aggregate.norm())
    assert ratio <= float(ts.sum() / (ts.sum() - ts[-1])) + 1e-4


@pytest.mark.parametrize("eps", [1e-3, 1e-8])
def test_a_tiny_update_cannot_take_the_step_down(eps: float) -> None:
    """The review's case: one client sends eps times an honest direction. With
    weights TS/|x| the aggregate's norm was a harmonic mean of the norms (0.009 at
    eps 1e-3, 1e-8 at eps 1e-8 with every honest client quantized to weight 0);
    with the median norm as a floor the tiny row weighs as a median row."""
    honest, server = _galaxy()
    tiny = eps * honest[:1] / honest[:1].norm()
    r = fltrust(torch.cat([honest, tiny]), server_update=server)
    alone = fltrust(honest, server_update=server)
    assert r.selected is not None and bool(r.selected[:7].all())
    assert float(r.aggregate.norm()) > 0.8 * float(alone.aggregate.norm())


def test_no_trust_at_all_gives_nothing() -> None:
    honest, server = _galaxy()
    r = fltrust(-honest, server_update=server)
    assert r.selected is not None and not r.selected.any()
    assert float(r.aggregate.abs().sum()) == 0.0
    d = GalaxyDefense(0, DefenseConfig(layers=frozenset({1, 3}), aggregator="fltrust"))
    report = d.run(
        round=0, clients=list(range(7)), updates=-honest, server_update=server
    )
    assert report.aggregate is None and report.weight == 0
    assert all(not o.selected for o in report.outcomes.values())


def test_the_rule_refuses_to_run_without_a_server_update() -> None:
    honest, server = _galaxy()
    with pytest.raises(ValueError, match="needs the server's update"):
        get_aggregator("fltrust")(honest)
    with pytest.raises(ValueError, match="values, not"):
        fltrust(honest, server_update=server[:10])
    with pytest.raises(ValueError, match="zero"):
        fltrust(honest, server_update=torch.zeros(D))


def _published(
    report_weights: dict[int, int | None], null: int | None = None
) -> ReplayHints:
    return ReplayHints(
        flags={c: frozenset() for c in report_weights},
        selected=frozenset(c for c, w in report_weights.items() if w),
        weights={c: int(w or 0) for c, w in report_weights.items()},
        null_weight=null,
    )


def test_a_galaxy_cannot_publish_weight_for_an_update_the_server_contradicts() -> None:
    """The replay recomputes the trust scores from the revealed updates and the
    server update: weight moved onto a sign-flipped update is a false decision."""
    honest, server = _galaxy()
    x = torch.cat([honest, -4 * honest[:3]])
    clients = list(range(10))
    cfg = DefenseConfig(layers=frozenset({1, 3}), aggregator="fltrust")
    report = GalaxyDefense(0, cfg).run(
        round=0, clients=clients, updates=x, server_update=server
    )
    weights = {c: report.outcomes[c].weight for c in clients}
    assert [weights[c] for c in (7, 8, 9)] == [0, 0, 0]
    # the honest publication replays
    replay = _replay(cfg, clients, x, server, _published(weights, report.null_weight))
    assert replay.aggregate is not None and report.aggregate is not None
    assert torch.equal(replay.aggregate, report.aggregate)
    # the attacker's update gets the weight of an honest one
    lying = dict(weights)
    lying[8] = weights[0]
    with pytest.raises(ReplayMismatch, match="fltrust"):
        _replay(cfg, clients, x, server, _published(lying, report.null_weight))
    # or one honest client counts a third of what it should (the same selection)
    heavier = dict(weights)
    heavier[0] = int(weights[0] or 0) // 3
    with pytest.raises(ReplayMismatch, match="fltrust: published weights differ"):
        _replay(cfg, clients, x, server, _published(heavier, report.null_weight))
    # or the zero update's weight (which sets the aggregate's norm) is changed,
    # or not published
    assert report.null_weight is not None
    for null in (2 * report.null_weight + 1000, None):
        with pytest.raises(ReplayMismatch, match="fltrust"):
            _replay(cfg, clients, x, server, _published(weights, null))
    # and against another server update, the honest publication does not replay
    other = torch.randn(D, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ReplayMismatch, match="fltrust"):
        _replay(cfg, clients, x, other, _published(weights, report.null_weight))


@pytest.fixture(scope="module")
def fltrust_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fltrust")
    config = load_config(
        overrides={
            "defense.aggregator": "fltrust",
            "defense.layers": [1, 3],
            "training.rounds": 2,
            "clients.samples_per_client": 100,
            "audit.keep_updates": 2,
        }
    )
    Simulation(
        config, dataset=load_dataset("mnist"), artefacts=ArtefactWriter(root)
    ).run()
    return root


def _audit(path: Path) -> tuple[int, str]:
    lines: list[str] = []
    return audit_run(path, out=lines.append), "\n".join(lines)


def test_a_fltrust_run_verifies_and_its_server_update_is_the_signed_one(
    fltrust_run: Path, tmp_path: Path
) -> None:
    """The run publishes each round's server update, named by digest in the
    signed round record and in every transcript; the audit replays FLTrust's
    weights against it, and a substituted update (the attackers' direction, say)
    is caught before any replay."""
    code, out = _audit(fltrust_run)
    assert code == 0, out
    assert "replay verifies" in out
    r1 = fltrust_run / "audit" / "rounds" / "000001" / "server_update.pgt1"
    assert r1.exists()
    copy = tmp_path / "run"
    shutil.copytree(fltrust_run, copy)
    target = copy / "audit" / "rounds" / "000001" / "server_update.pgt1"
    update = decode_update(target.read_bytes())["update"]
    target.write_bytes(encode_update({"update": -update}))
    code, out = _audit(copy)
    assert code != 0
    assert "round 1" in out and "server_update.pgt1" in out


def test_the_services_refuse_fltrust_before_anything_starts(tmp_path: Path) -> None:
    """No service holds a root dataset: `protogalaxy up` (like the chart's schema)
    refuses the rule with the reason, and makes no run directory."""
    config = tmp_path / "config.yaml"
    config.write_text("defense:\n  aggregator: fltrust\n")
    out = tmp_path / "up"
    done = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "up", "--config", str(config),
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "runs in `protogalaxy simulate` only" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("rule", ["fltrust", "geometric_median", "centered_clipping"])
def test_a_galaxy_cannot_slip_weight_to_a_huge_update(rule: str) -> None:
    """A review's attack on every rule whose weights are replayed within a
    tolerance: a colluding client sends -1e6 times the server's direction, and
    the galaxy publishes 0.99e-4 of the total weight for it (within the old
    per-weight bound of 1e-4). That turned the aggregate around (cosine -1.0
    with the honest direction) and the replay accepted it. Published weights may
    now move the aggregate by at most 1e-4 of the median norm."""
    honest, server = _galaxy()
    x = torch.cat([honest[:6], torch.randn(3, D) + server, (-1e6 * server)[None]])
    clients = list(range(10))
    cfg = DefenseConfig(layers=frozenset({1, 3}), aggregator=rule)
    report = GalaxyDefense(0, cfg).run(
        round=0, clients=clients, updates=x, server_update=server
    )
    assert report.aggregate is not None
    weights = {c: int(report.outcomes[c].weight or 0) for c in clients}
    replay = _replay(
        cfg,
        clients,
        x,
        server,
        _published(weights, report.null_weight) if rule == "fltrust" else _all(weights),
    )
    assert replay.aggregate is not None
    assert torch.equal(replay.aggregate, report.aggregate)
    lying = dict(weights)
    lying[9] += int(sum(weights.values()) * 0.99e-4)
    with pytest.raises(ReplayMismatch, match=rule):
        _replay(
            cfg,
            clients,
            x,
            server,
            _published(lying, report.null_weight) if rule == "fltrust" else _all(lying),
        )


def _replay(
    cfg: DefenseConfig,
    clients: list[int],
    x: torch.Tensor,
    server: torch.Tensor,
    hints: ReplayHints,
) -> GalaxyDefenseReport:
    """Galaxy 0's round 0 replayed against published decisions ``hints``."""
    return GalaxyDefense(0, cfg).run(
        round=0, clients=clients, updates=x, server_update=server, hints=hints
    )


def _all(weights: dict[int, int]) -> ReplayHints:
    """Published decisions of a rule under which every candidate takes part."""
    return ReplayHints(
        flags={c: frozenset() for c in weights},
        selected=frozenset(weights),
        weights=dict(weights),
    )


@pytest.mark.parametrize(
    ("records", "at"), [("another", 1), ("none", 1), ("another", 0), ("none", 0)]
)
def test_a_global_aggregator_that_hands_out_one_update_and_records_another_is_named(
    tmp_path: Path, records: str, at: int
) -> None:
    """Trust nobody, the global aggregator included: it signs the server update it
    hands the galaxies, each transcript keeps that statement, so recording
    another update (or none) in the round record is caught by its own signature.
    The audit names the global aggregator; each galaxy is held to its own signed
    transcript, whose reputation state carries on, so the next round (every
    layer on) does not blame the galaxies either."""
    config = load_config(
        overrides={
            "defense.aggregator": "fltrust",
            "training.rounds": 2,
            "clients.samples_per_client": 100,
            "audit.keep_updates": 2,
        }
    )
    sim = Simulation(
        config, dataset=load_dataset("mnist"), artefacts=ArtefactWriter(tmp_path)
    )
    agg = sim.global_agg
    record = agg._record

    def equivocating(round: int, *args: Any) -> SignedDocument:
        if round == at:  # what it records and publishes: another update, or none
            given = agg._state.server_update
            assert given is not None
            agg._state.server_update = -given if records == "another" else None
        return record(round, *args)

    agg._record = equivocating  # type: ignore[method-assign]
    sim.run()
    code, out = _audit(tmp_path)
    assert code != 0
    why = {
        "another": "the global aggregator signed two server updates",
        "none": "the round record names no server update, which fltrust needs",
    }[records]
    assert f"FAIL round {at} global: {why}" in out
    assert "round 1: ok" in out or at == 1
    assert "galaxy" not in "".join(
        line.split(":")[0] for line in out.splitlines() if line.startswith("FAIL")
    ), out


def test_a_galaxy_takes_only_the_global_aggregators_signed_server_update(
    fltrust_run: Path,
) -> None:
    sim_config = load_config(
        overrides={"defense.aggregator": "fltrust", "clients.samples_per_client": 50}
    )
    sim = Simulation(sim_config, dataset=load_dataset("mnist"))
    update = torch.randn(sim.spec.numel)
    statement = sim.global_agg.set_server_update(0, update)
    galaxy = sim.galaxies[0]
    galaxy.set_server_update(0, update, statement)  # the genuine one
    with pytest.raises(ValueError, match="not of this update"):
        galaxy.set_server_update(0, -update, statement)
    with pytest.raises(ValueError, match="not of this update"):
        galaxy.set_server_update(1, update, statement)
    forged = sign_document(
        galaxy.key, "server-update", dict(statement.body), run=sim.run_id
    )
    with pytest.raises(VerificationError):
        galaxy.set_server_update(0, update, forged)


def test_the_audit_reads_the_server_update_as_the_float32_values_signed(
    fltrust_run: Path, tmp_path: Path
) -> None:
    """The digest is over float32 values; float64 values within half an ulp of
    them hash the same, and could flip a borderline trust score (a review's
    finding): any other dtype or shape is refused."""
    copy = tmp_path / "run"
    shutil.copytree(fltrust_run, copy)
    target = copy / "audit" / "rounds" / "000001" / "server_update.pgt1"
    update = decode_update(target.read_bytes())["update"]
    target.write_bytes(encode_update({"update": update.double()}))
    code, out = _audit(copy)
    assert code != 0 and "float32" in out


def test_colluders_that_are_most_of_a_galaxy_cannot_loosen_the_replay() -> None:
    """A second review's attack: four colluders send huge updates against the
    server's (trust 0), a fifth a huge one almost orthogonal to it (trust 0.045),
    beside four honest clients. Bounded by 1e-4 of the median row norm, the
    replay took the galaxy's choice of null weight, or a thousandfold aggregate
    along the fifth row; the bound is now 1e-4 of the rule's own weighted norm."""
    g = torch.Generator().manual_seed(4)
    server = torch.randn(D, generator=g)
    honest = server + 0.8 * torch.randn(4, D, generator=g)
    big = 1e7 * float(server.norm())
    s_hat = server / server.norm()
    u = torch.randn(D, generator=g)
    u -= (u @ s_hat) * s_hat
    u /= u.norm()
    against = (-big * s_hat).repeat(4, 1) + torch.randn(4, D, generator=g)
    sneaky = (big * (0.999 * u + 0.045 * s_hat))[None]
    x = torch.cat([honest, against, sneaky])
    clients = list(range(9))
    cfg = DefenseConfig(layers=frozenset({1, 3}), aggregator="fltrust")
    report = GalaxyDefense(0, cfg).run(
        round=0, clients=clients, updates=x, server_update=server
    )
    assert report.null_weight is not None
    w = {c: int(report.outcomes[c].weight or 0) for c in clients}
    total = sum(w.values()) + report.null_weight
    for weights, null in [
        (w, 0),
        (w, report.null_weight // 2),
        ({**w, 8: w[8] + int(0.9e-4 * total)}, report.null_weight),
        ({c: max(v // 1000, int(c == 8)) for c, v in w.items()}, 2**29 - 1),
    ]:
        with pytest.raises(ReplayMismatch, match="fltrust"):
            _replay(cfg, clients, x, server, _published(weights, null))

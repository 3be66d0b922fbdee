"""Client sampling per round (clients.fraction_fit): one seeded draw every party
computes alike; a galaxy refuses clients outside it, and the audit fails a galaxy
that lets them in."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter

import pytest
import torch

from protogalaxy.config import ConfigError, load_config
from protogalaxy.crypto import commit
from protogalaxy.crypto.identity import sign_commitment, sign_registration
from protogalaxy.defense.reputation import ClientRecord
from protogalaxy.learning.datasets import Dataset
from protogalaxy.protocol.galaxy import Rejected
from protogalaxy.protocol.sampling import Sampling, exceed_probability
from protogalaxy.simulation import Simulation
from tests.protocol.test_galaxy_round import RUN, SPEC, STORE_FACTORY, World, honest


def test_the_draw_is_seeded_sized_and_fair() -> None:
    s = Sampling(0.3, seed=7)
    members = list(range(3, 300, 3))  # a galaxy's 99 clients
    a = s.clients(members, 4, 1)
    assert len(a) == math.ceil(0.3 * 99) and a <= set(members)
    assert s.clients(reversed(members), 4, 1) == a  # order does not matter
    assert Sampling(0.3, seed=7).clients(members, 4, 1) == a  # anyone recomputes it
    assert s.clients(members, 5, 1) != a  # another round
    assert s.clients(members, 4, 2) != a  # another galaxy
    assert Sampling(0.3, seed=8).clients(members, 4, 1) != a  # another run
    assert Sampling(1.0).clients(members, 4, 1) == set(members)
    assert Sampling(0.001).size(5) == 1
    assert Sampling(0.07).size(100) == 7  # exact decimal: a float product gives 8
    # Over many rounds every client is drawn about equally often.
    counts = Counter(c for r in range(400) for c in s.clients(members, r, 1))
    assert set(counts) == set(members)
    assert max(counts.values()) < 1.6 * min(counts.values())
    with pytest.raises(ValueError):
        Sampling(0.0)


def test_the_chance_a_sample_exceeds_f() -> None:
    """The hypergeometric tail, against counting every possible sample."""
    for n, bad, k, f in [(8, 3, 4, 1), (10, 3, 5, 1), (9, 0, 4, 0), (7, 7, 3, 2)]:
        pool = [1] * bad + [0] * (n - bad)
        samples = list(itertools.combinations(range(n), k))
        over = sum(1 for s in samples if sum(pool[i] for i in s) > f)
        assert exceed_probability(n, bad, k, f) == pytest.approx(over / len(samples))
    assert exceed_probability(10, 3, 10, 3) == 0.0
    assert exceed_probability(10, 3, 10, 2) == 1.0
    # at scale, against the exact integer sum
    n, bad, k = 2000, 600, 1000
    for f in (280, 300, 320):
        exact = sum(
            math.comb(bad, x) * math.comb(n - bad, k - x) for x in range(f + 1, bad + 1)
        ) / math.comb(n, k)
        assert exceed_probability(n, bad, k, f) == pytest.approx(exact, rel=1e-9)


def test_the_configuration_keeps_f_for_the_sample() -> None:
    with pytest.raises(ConfigError, match=r"in 50\.0% of rounds"):
        load_config(overrides={"clients.fraction_fit": 0.5})
    with pytest.raises(ConfigError, match="needs at least 7"):
        load_config(
            overrides={
                "clients.fraction_fit": 0.5,
                "defense.byzantine_fraction": 0.45,
            }
        )
    ok = load_config(
        overrides={
            "clients.count": 60,
            "clients.fraction_fit": 0.5,
            "byzantine.fraction": 0.1,
        }
    )
    assert ok.sampling() == Sampling(0.5, ok.seed)


def world(n: int = 10) -> tuple[World, frozenset[int]]:
    w = World(n, layers=(1,), agg="fedavg")
    w.galaxy.sampling = Sampling(0.5, seed=3)
    sample = w.galaxy.sample(0)
    assert sample is not None and len(sample) == 5
    return w, sample


def test_a_galaxy_takes_only_the_rounds_sample() -> None:
    w, sample = world()
    w.galaxy.open_round(0)
    outside = min(set(range(10)) - sample)
    com, _ = commit(
        SPEC.unflatten(honest(1)[0]), client_id=outside, galaxy_id=0, round=0
    )
    with pytest.raises(Rejected) as err:
        w.galaxy.submit_commitment(com, sign_commitment(w.keys[outside], com, run=RUN))
    assert err.value.reason == "not_sampled"
    assert w.store.commitment_count(0) == 0
    # The quorum's base is the sample: its five commitments close the phase.
    inside = sorted(sample)
    for c in inside[:4]:
        com, _ = commit(SPEC.unflatten(honest(1)[0]), client_id=c, galaxy_id=0, round=0)
        w.galaxy.submit_commitment(com, sign_commitment(w.keys[c], com, run=RUN))
        assert not w.galaxy.commit_quorum_reached(0)
    c = inside[4]
    com, _ = commit(SPEC.unflatten(honest(1)[0]), client_id=c, galaxy_id=0, round=0)
    w.galaxy.submit_commitment(com, sign_commitment(w.keys[c], com, run=RUN))
    assert w.galaxy.commit_quorum_reached(0)
    w.galaxy.close_commit(0, force=True)
    # Not being drawn is not missing a round.
    missed = w.galaxy._missed()
    assert all(missed[c] == 0 for c in range(10)), missed


def small(data: Dataset) -> Dataset:
    return Dataset(
        data.name,
        data.x_train[:2000],
        data.y_train[:2000],
        data.x_test[:500],
        data.y_test[:500],
        data.num_classes,
    )


def test_a_sampled_run_and_a_galaxy_that_ignores_the_sample(mnist: Dataset) -> None:
    """Only sampled clients train and are aggregated; a galaxy that lets the
    others in too is caught by the global aggregator's audit and isolated."""
    config = load_config(
        overrides={
            "clients.count": 40,
            "galaxies.count": 2,
            "clients.samples_per_client": 40,
            "clients.fraction_fit": 0.5,
            "byzantine.fraction": 0.0,
            "training.rounds": 2,
        }
    )
    sim = Simulation(config, dataset=small(mnist))
    trained: list[list[int]] = []
    real_train = sim._train

    def spy(round: int, clients: list[int]) -> torch.Tensor:
        trained.append(list(clients))
        return real_train(round, clients)

    sim._train = spy  # type: ignore[method-assign]
    sim.run_round(0)
    sampling = config.sampling()
    members = config.galaxy_members()
    want = set().union(*(sampling.clients(m, 0, g) for g, m in members.items()))
    assert set(trained[0]) == want and len(want) == 20
    assert not sim.global_agg.isolated
    # Galaxy 1 now ignores the sample: every one of its clients trains, commits
    # and is aggregated there.
    sim.galaxies[1].sampling = Sampling()
    real_sampled = sim._sampled
    sim._sampled = lambda r, c: c % 2 == 1 or real_sampled(r, c)  # type: ignore[method-assign]
    sim.run_round(1)
    assert sim.global_agg.isolated.get(1, {}).get("kind") == "not_sampled", (
        sim.global_agg.isolated
    )
    assert 0 not in sim.global_agg.isolated


def test_every_replica_admits_the_sample_the_opener_drew() -> None:
    """A second replica, or a restarted process, whose placement is not current
    yet admits exactly the stored sample of the round (the review's attack: a
    stale replica admitted a client outside the sample, the audit then isolated
    the honest galaxy)."""
    w, sample = world()
    w.galaxy.open_round(0)
    stale = w.replica()
    stale.sampling = Sampling(0.5, seed=3)
    # its placement puts only clients 0-3 here: its own draw would differ
    stale.roster = dataclasses.replace(
        stale.roster, galaxy_of=lambda c: 0 if c < 4 else 1
    )
    assert stale._draw_sample(0) != sample
    assert stale.sample(0) == sample
    outside = min(set(range(10)) - sample)
    com, _ = commit(
        SPEC.unflatten(honest(1)[0]), client_id=outside, galaxy_id=0, round=0
    )
    with pytest.raises(Rejected) as err:
        stale.submit_commitment(com, sign_commitment(w.keys[outside], com, run=RUN))
    assert err.value.reason == "not_sampled"


def test_a_sample_of_banned_clients_closes_at_once() -> None:
    """Banned clients never commit: a round whose sample holds only them closes
    (and the galaxy abstains) at once instead of waiting out its deadline."""
    w = World(10, layers=(1, 4), agg="fedavg")
    w.galaxy.sampling = Sampling(0.2, seed=3)
    sample = w.galaxy._draw_sample(0)
    w.galaxy.open_round(0)
    assert not w.galaxy.commit_quorum_reached(0)
    tracker = w.galaxy.defense.tracker
    for c in sample:
        tracker.clients[c] = ClientRecord(0.0, status="banned")
    w.store.save_reputation(tracker.state_dict())
    assert all(w.galaxy.defense.banned(c) for c in sample)
    assert w.galaxy.commit_quorum_reached(0)
    assert w.galaxy.close_commit(0) is None  # nothing to send: the galaxy abstains


def test_a_galaxy_that_takes_another_galaxys_client_is_caught(mnist: Dataset) -> None:
    """Without sampling too: a galaxy that admits a client placed in another
    galaxy (its commitment validly signed, for this galaxy) fails the audit."""
    config = load_config(
        overrides={
            "clients.count": 20,
            "galaxies.count": 2,
            "clients.samples_per_client": 40,
            "byzantine.fraction": 0.0,
            "training.rounds": 2,
        }
    )
    sim = Simulation(config, dataset=small(mnist))
    sim.run_round(0)
    lying = sim.galaxies[1]
    lying.roster = dataclasses.replace(lying.roster, galaxy_of=lambda c: 1)
    sim._register(lying, 0)  # client 0 belongs to galaxy 0
    real_galaxy_of = sim.galaxy_of
    sim.galaxy_of = lambda c: lying if c == 0 else real_galaxy_of(c)  # type: ignore[method-assign]
    # one of its own clients sits the round out: its tree is no larger than it
    # may be, so only the membership check can catch it
    sim._sampled = lambda r, c: c != 1  # type: ignore[method-assign]
    sim.run_round(1)
    assert sim.global_agg.isolated.get(1, {}).get("kind") == "not_member", (
        sim.global_agg.isolated
    )


def test_the_first_round_waits_for_every_client_placed_here() -> None:
    """Client pods come up at different times: round 0 waits for all of a
    galaxy's clients to register (or its deadline), so a pod a moment late does
    not lose the first rounds. A review's CI run caught a late pod's attackers
    trailing the others and left unquarantined at the end. Later rounds close at
    the quorum of the clients registered."""
    w = World(6, layers=(1,), agg="fedavg")
    w.store = STORE_FACTORY()
    galaxy = w.replica()
    for c in range(4):
        key = w.keys[c]
        galaxy.register(
            c,
            key.public_key.to_bytes(),
            sign_registration(key, client_id=c, galaxy_id=0, run=RUN),
        )
    w.galaxy = galaxy
    updates = honest(6)
    w.commit_all(0, {c: updates[c] for c in range(4)})
    assert not galaxy.commit_quorum_reached(0)  # two clients not here yet
    for c in (4, 5):
        key = w.keys[c]
        galaxy.register(
            c,
            key.public_key.to_bytes(),
            sign_registration(key, client_id=c, galaxy_id=0, run=RUN),
        )
    assert not galaxy.commit_quorum_reached(0)  # here, not yet committed
    w.commit_all(0, {c: updates[c] for c in (4, 5)})
    assert galaxy.commit_quorum_reached(0)

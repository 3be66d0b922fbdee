"""What verifiable aggregation costs (issue 11), measured inside one default run.

One ``protogalaxy simulate`` run of the default config (in-process), with timers on
the functions the audit added, so floor and subject are the same rounds:

* overhead: the galaxies' acknowledgements, transcripts (built, digested and
  signed), reputation snapshots and signed evidence; the global aggregator's
  acknowledgement and transcript intake, transcript checks and signed round
  records. Goal: at most 5% of a default round without them (and without the
  replays, bounded next).
* replay: the global aggregator's full replay of one galaxy's round (every reveal
  checked against its leaf and its client's signature, layers 1-4 again, the
  aggregate recomputed) against that galaxy's own work on the round: layer 1 on
  every reveal and layers 2-4 with the aggregation. Goal: at most 1.5x.

``up`` against ``simulate`` is bench/up.py.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from bench.common import report
from protogalaxy.config import load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.logs import setup_logging
from protogalaxy.protocol import audit as audit_mod
from protogalaxy.protocol import galaxy as galaxy_mod
from protogalaxy.protocol.galaxy import GalaxyAggregator
from protogalaxy.protocol.global_aggregator import GlobalAggregator
from protogalaxy.simulation import Simulation


class Timers:
    """Seconds spent in wrapped callables, by (name, galaxy)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, int | None], float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: str, *, method: bool) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            g = getattr(args[0], "galaxy", None) if method and args else None
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                key = (name, g if isinstance(g, int) else None)
                self.seconds[key] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def total(self, *names: str) -> float:
        return sum(s for (n, _), s in self.seconds.items() if n in names)

    def of(self, name: str, galaxy: int) -> float:
        return self.seconds.get((name, galaxy), 0.0)

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()


OVERHEAD = (
    "galaxy.acknowledge",
    "galaxy.transcript_body",
    "galaxy.sign_transcript",
    "galaxy.sign_evidence",
    "galaxy.reputation_state",
    "global.submit_ack",
    "global.submit_transcript",
    "global.check_transcript",
    "global.record",
)


def run(quick: bool = False) -> list[dict[str, Any]]:
    rounds = 3 if quick else 10
    print(f"verifiable aggregation: default config, {rounds} rounds, in-process")
    setup_logging("error")  # the run's quarantine events are not the figures
    config = load_config(overrides={"training.rounds": rounds})
    sim = Simulation(config, dataset=load_dataset("mnist"))
    timers = Timers()
    t = timers.wrap
    t(GalaxyAggregator, "_acknowledge", "galaxy.acknowledge", method=True)
    t(GalaxyAggregator, "_transcript_body", "galaxy.transcript_body", method=True)
    t(galaxy_mod, "sign_document", "galaxy.sign_transcript", method=False)
    t(galaxy_mod, "sign_inline", "galaxy.sign_evidence", method=False)
    t(galaxy_mod, "reputation_state", "galaxy.reputation_state", method=False)
    t(GalaxyAggregator, "submit_reveal", "galaxy.submit_reveal", method=True)
    t(GalaxyAggregator, "_defend", "galaxy.defend", method=True)
    t(GlobalAggregator, "submit_ack", "global.submit_ack", method=False)
    t(GlobalAggregator, "submit_transcript", "global.submit_transcript", method=False)
    t(audit_mod, "check_transcript", "global.check_transcript", method=False)
    t(GlobalAggregator, "_record", "global.record", method=False)
    t(audit_mod, "replay", "global.replay", method=False)
    # replay(gr, ...): the galaxy is the first argument's
    replay = audit_mod.replay

    def replay_by_galaxy(gr: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return replay(gr, *args, **kwargs)
        finally:
            timers.seconds[("global.replay_of", gr.galaxy)] += time.perf_counter() - t0

    audit_mod.replay = replay_by_galaxy
    try:
        t0 = time.perf_counter()
        result = sim.run()
        wall = time.perf_counter() - t0
    finally:
        audit_mod.replay = replay
        timers.restore()
    summary = result.summary()
    round_s = sum(m.round_seconds for m in result.rounds)
    # the aggregators' own work: closing reveals (layers 2-4, aggregation) and
    # the global round (audit included)
    agg_s = sum(m.aggregation_seconds for m in result.rounds)
    overhead = timers.total(*OVERHEAD)
    replays = timers.total("global.replay")
    base = round_s - overhead - replays
    share = overhead / base
    parts = ", ".join(f"{n.split('.', 1)[1]} {timers.total(n):.2f}" for n in OVERHEAD)
    print(
        f"  accuracy {summary['final_accuracy']:.4f}, rounds {round_s:.1f} s of "
        f"{wall:.1f} s wall; overhead {overhead:.2f} s ({parts}); replays "
        f"{replays:.2f} s"
    )
    out = [
        report(
            "transcripts, acks, signatures / a round",
            share,
            "<= 0.05",
            share <= 0.05,
            f"{overhead:.2f} s over {rounds} rounds of {base:.1f} s "
            "(rounds without them and without the replays; local training "
            f"dominates: they are {overhead / (agg_s - overhead - replays):.0%} of "
            "the aggregators' own work)",
        )
    ]
    ratios = {}
    for g in sorted(sim.galaxies):
        own = (
            timers.of("galaxy.submit_reveal", g)
            - timers.of("galaxy.acknowledge", g)
            + timers.of("galaxy.defend", g)
        )
        ratios[g] = timers.of("global.replay_of", g) / own
    worst = max(ratios, key=lambda g: ratios[g])
    out.append(
        report(
            "replay of one galaxy / its own aggregation",
            ratios[worst],
            "<= 1.50",
            ratios[worst] <= 1.5,
            "per galaxy: "
            + ", ".join(f"{g}: {r:.2f}" for g, r in sorted(ratios.items()))
            + " (layer 1 on every reveal + layers 2-4 + aggregation, all rounds)",
        )
    )
    return out

"""Compromised galaxies, for the scenarios that show the audits catch them.

A :class:`CompromisedGalaxy` is a galaxy aggregator that, from ``from_round`` on,
lies in one of the ways the Protogalaxy paper's threat model names (its Scenario 3
and the issue's list), with its own key, while looking honest on the wire:

``modify``
    aggregates altered copies of a fraction of its clients' updates, while its
    transcript names their genuine ones;
``drop``
    acknowledges a fraction of the reveals, then records them as withheld;
``frame_rejection``
    records a fraction of valid reveals as rejected by layer 1 (``shape``);
``frame_statistics``
    flags a fraction of its clients in layer 2 with fabricated test results;
``inflate_weight``
    signs an aggregate weight of its whole tree, more than it aggregated;
``inconsistent_aggregate``
    sends an aggregate that is not the one its transcript names;
``withhold_transcript``
    sends its aggregate and never its transcript.

Victims are drawn with the attack's seed among the reveals the galaxy took, at least
one a round. Every victim of a round is listed in :attr:`CompromisedGalaxy.victims`,
and logged as a ``simulated_galaxy_attack`` event (the scenario's ground truth, as
a Byzantine client's attack is; the audit never reads it), so a scenario can count
false attributions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Final

import torch

from protogalaxy.codec import decode_update, encode_update
from protogalaxy.crypto.statements import SignedDocument
from protogalaxy.crypto.trees import GalaxyTree
from protogalaxy.defense.pipeline import GalaxyDefenseReport
from protogalaxy.protocol.galaxy import GalaxyAggregator, RoundInputs

__all__ = ["GALAXY_ATTACKS", "CompromisedGalaxy", "GalaxyAttack"]

_log = logging.getLogger("protogalaxy.compromised")

GALAXY_ATTACKS: Final = (
    "modify",
    "drop",
    "frame_rejection",
    "frame_statistics",
    "inflate_weight",
    "inconsistent_aggregate",
    "withhold_transcript",
)


@dataclass(frozen=True)
class GalaxyAttack:
    kind: str
    from_round: int = 2
    fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GALAXY_ATTACKS:
            raise ValueError(
                f"galaxy attack must be one of {', '.join(GALAXY_ATTACKS)}; "
                f"got {self.kind!r}"
            )
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")


class CompromisedGalaxy(GalaxyAggregator):
    """A galaxy aggregator that lies from ``attack.from_round`` on."""

    def __init__(self, galaxy: int, *, attack: GalaxyAttack, **kwargs: Any) -> None:
        super().__init__(galaxy, **kwargs)
        self.attack = attack
        #: round -> the clients the galaxy lied about
        self.victims: dict[int, list[int]] = {}

    def lying(self, round: int) -> bool:
        return round >= self.attack.from_round

    def _note(self, round: int, victims: list[int]) -> None:
        if round in self.victims:
            return
        self.victims[round] = victims
        _log.warning(
            "simulated_galaxy_attack",
            extra={
                "event_record": {
                    "event": "simulated_galaxy_attack",
                    "galaxy": self.galaxy,
                    "round": round,
                    "attack": self.attack.kind,
                    "victims": victims,
                }
            },
        )

    def _draw(self, round: int, candidates: list[int]) -> list[int]:
        if not candidates:
            return []
        k = max(1, math.ceil(self.attack.fraction * len(candidates)))
        rng = random.Random(f"{self.attack.seed}:{self.galaxy}:{round}")
        chosen = sorted(rng.sample(sorted(candidates), min(k, len(candidates))))
        self._note(round, chosen)
        return chosen

    def _round_inputs(self, round: int, tree: GalaxyTree) -> RoundInputs:
        inputs = super()._round_inputs(round, tree)
        kind = self.attack.kind
        if not self.lying(round) or kind not in ("drop", "frame_rejection"):
            return inputs
        victims = set(self._draw(round, inputs.clients))
        keep = [c for c in inputs.clients if c not in victims]
        rejections = dict(inputs.rejections)
        withheld = list(inputs.withheld)
        for c in victims:
            if kind == "drop":
                withheld.append(c)
            else:  # a rejection it makes up, with the client's genuine reveal
                proof = inputs.proofs[c]
                rejections[c] = {
                    "reason": "shape",
                    "nonce": proof[:32].hex(),
                    "digest": tree.commitment_of(c).digest.hex(),
                    "signature": proof[32:].hex(),
                }
        return dataclasses.replace(
            inputs,
            clients=keep,
            bodies={c: inputs.bodies[c] for c in keep},
            proofs={c: inputs.proofs[c] for c in keep},
            rejections=rejections,
            withheld=sorted(withheld),
        )

    def _defend(
        self,
        round: int,
        tree: GalaxyTree,
        inputs: RoundInputs,
        reference_direction: torch.Tensor | None,
    ) -> GalaxyDefenseReport:
        kind = self.attack.kind
        if not self.lying(round) or kind not in ("modify", "frame_statistics"):
            return super()._defend(round, tree, inputs, reference_direction)
        victims = self._draw(round, inputs.clients)
        if kind == "modify":
            bodies = dict(inputs.bodies)
            for c in victims:
                tensors = decode_update(bodies[c])
                bodies[c] = encode_update({k: -4.0 * v for k, v in tensors.items()})
            return super()._defend(
                round,
                tree,
                dataclasses.replace(inputs, bodies=bodies),
                reference_direction,
            )
        # frame_statistics: layer 2 "finds" two failed tests in each victim
        defense = self.defense
        honest_layer2 = defense._layer2

        def framed(clients: list[int], *args: Any, **kwargs: Any) -> Any:
            stats = honest_layer2(clients, *args, **kwargs)
            outcomes = args[2] if len(args) > 2 else kwargs["outcomes"]
            for c in victims:
                o = outcomes[c]
                fake = sorted(set(o.flags) | {"norm", "direction"})
                o.reasons = [r for r in o.reasons if not r.startswith("statistics:")]
                o.reasons += [f"statistics:{t}" for t in fake]
                o.flags, o.flagged = fake, True
            return stats

        defense._layer2 = framed  # type: ignore[method-assign]
        try:
            return super()._defend(round, tree, inputs, reference_direction)
        finally:
            del defense._layer2

    def _published_aggregate(
        self, round: int, weight: int, values: bytes
    ) -> tuple[int, bytes]:
        kind = self.attack.kind
        if self.lying(round) and kind == "inflate_weight":
            self._note(round, [])
            tree = self._tree(round)
            assert tree is not None
            weight = tree.size
        if self.lying(round) and kind == "inconsistent_aggregate":
            self._note(round, [])
            altered = torch.frombuffer(bytearray(values), dtype=torch.float32) * 1.5
            values = altered.numpy().tobytes()
        return weight, values

    def transcript(
        self, round: int
    ) -> tuple[SignedDocument, dict[str, Any], dict[str, Any]] | None:
        if self.lying(round) and self.attack.kind == "withhold_transcript":
            self._note(round, [])
            return None
        return super().transcript(round)

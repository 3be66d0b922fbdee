"""TensorBoard scalars for a run: ``protogalaxy simulate --tensorboard DIR``.

One step per round (the round number, from 0 as everywhere else):

* ``eval/accuracy``, ``eval/loss`` and, for the backdoor and the targeted flip,
  ``eval/attack_success``;
* ``flags/layer1_integrity``, ``flags/layer2_statistics``, ``flags/layer3_robust``
  (updates each layer flagged), ``flags/byzantine_flagged`` (Byzantine clients any
  layer flagged);
* ``reputation/honest_mean``, ``reputation/byzantine_mean`` and
  ``reputation/byzantine_max`` (layer 4), ``clients/quarantined``,
  ``clients/banned``;
* ``galaxies/excluded``, ``galaxies/isolated`` (layer 5 and the audit);
* ``time/round_seconds``, ``time/aggregation_seconds``, ``time/eval_seconds``.

Written with tensorboardX (event files TensorBoard reads: ``tensorboard --logdir
DIR``). Use it from Python as ``Simulation.run(after_round=TensorBoardLog(dir))``.
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protogalaxy.simulation import SimulationResult

__all__ = ["TensorBoardLog"]


class TensorBoardLog:
    """An ``after_round`` callback that writes the last round's scalars."""

    def __init__(self, logdir: str | Path) -> None:
        from tensorboardX import SummaryWriter

        self.logdir = Path(logdir)
        self._writer = SummaryWriter(str(self.logdir))

    def __call__(self, result: SimulationResult) -> None:
        m = result.rounds[-1]
        step = m.round
        scalars: dict[str, float] = {
            "eval/accuracy": m.accuracy,
            "eval/loss": m.loss,
            "flags/layer1_integrity": m.flags_integrity,
            "flags/layer2_statistics": m.flags_statistics,
            "flags/layer3_robust": m.flags_robust,
            "flags/byzantine_flagged": m.byzantine_flagged,
            "clients/quarantined": m.quarantined,
            "clients/banned": m.banned,
            "galaxies/excluded": m.galaxies_excluded,
            "galaxies/isolated": m.galaxies_isolated,
            "time/round_seconds": m.round_seconds,
            "time/aggregation_seconds": m.aggregation_seconds,
            "time/eval_seconds": m.eval_seconds,
        }
        if m.attack_success_rate is not None:
            scalars["eval/attack_success"] = m.attack_success_rate
        byz = set(result.byzantine)
        now = {c: h[-1] for c, h in result.reputation_history.items() if h}
        honest = [r for c, r in now.items() if c not in byz]
        attackers = [r for c, r in now.items() if c in byz]
        if honest:
            scalars["reputation/honest_mean"] = fmean(honest)
        if attackers:
            scalars["reputation/byzantine_mean"] = fmean(attackers)
            scalars["reputation/byzantine_max"] = max(attackers)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

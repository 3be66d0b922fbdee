"""Client sampling per round (Flower's ``fraction_fit``), the same for every party.

Each round, each galaxy trains with ``k = max(1, ceil(fraction * n))`` of its
``n`` clients: those with the smallest ``SHA-256("PGS1:<seed>:<round>:<galaxy>:
<client>")``. Anyone who knows the run's seed and the placement of the clients
computes the same sample, and no party chooses it: the galaxy refuses a
commitment from a client outside it (403 ``not_sampled``), a client runner trains
only its sampled clients, and the global aggregator's audit fails a galaxy whose
transcript holds a client outside it (``not_sampled``).

A sample can draw more than its share of a galaxy's attackers. The configuration
check (:func:`exceed_probability`) refuses a sampling rate under which the
defense's ``f`` for the sample would be exceeded in more than 1% of a galaxy's
rounds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["MAX_EXCEED", "Sampling", "exceed_probability"]

#: the largest share of a galaxy's rounds in which its sample may hold more
#: attackers than the defense's f, for the configuration to be accepted
MAX_EXCEED = 0.01


@dataclass(frozen=True)
class Sampling:
    """``fraction`` of each galaxy's clients take part in each round, drawn
    with ``seed`` (the run's)."""

    fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    @property
    def everyone(self) -> bool:
        return self.fraction >= 1

    def size(self, n: int) -> int:
        """How many of ``n`` clients a round samples."""
        if self.everyone or n == 0:
            return n
        # in exact decimal arithmetic: 0.07 of 100 clients is 7, not 8
        return min(n, max(1, math.ceil(Fraction(str(self.fraction)) * n)))

    def clients(
        self, members: Iterable[int], round: int, galaxy: int
    ) -> frozenset[int]:
        """The sampled ones of a galaxy's ``members`` in ``round``."""
        pool = sorted(set(members))
        if self.everyone:
            return frozenset(pool)

        def rank(c: int) -> bytes:
            text = f"PGS1:{self.seed}:{round}:{galaxy}:{c}"
            return hashlib.sha256(text.encode()).digest()

        return frozenset(sorted(pool, key=rank)[: self.size(len(pool))])


def exceed_probability(n: int, bad: int, k: int, f: int) -> float:
    """The chance that ``k`` clients drawn without replacement from ``n``, of whom
    ``bad`` attack, hold more than ``f`` attackers (hypergeometric tail).

    Summed in log space term by term, stopping once the terms past the mode no
    longer count: exact enough for a 1% threshold, and quick at 100,000 clients
    (the exact integer sum took minutes there)."""
    if not 0 <= bad <= n or not 0 <= k <= n:
        raise ValueError("need 0 <= bad <= n and 0 <= k <= n")
    top = min(bad, k)
    start = max(f + 1, 0, k - (n - bad))
    if start > top:
        return 0.0

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    whole = log_comb(n, k)
    mode = (k + 1) * (bad + 1) // (n + 2)
    total = 0.0
    for x in range(start, top + 1):
        term = math.exp(log_comb(bad, x) + log_comb(n - bad, k - x) - whole)
        total += term
        if x > mode and term < 1e-17 * max(total, 1e-300):
            break
    return min(1.0, total)

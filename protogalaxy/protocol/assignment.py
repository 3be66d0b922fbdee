"""Which galaxy each client belongs to, and how that changes when a galaxy is
isolated (the paper's re-clustering, section 4.5).

A client's home galaxy is ``client mod galaxies``. Once the global aggregator has
isolated galaxies for misbehaving, the clients of an isolated galaxy move to the
galaxies still trusted, in turn (``active[client mod len(active)]``), from the next
round on; everyone computes the same placement from the signed list of isolated
galaxies. The moved clients keep their identities (the same keys, in every
galaxy's keyring) and their reputations (the global aggregator hands the adopting
galaxies each client's last verified record with the signed assignment).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Assignment"]


@dataclass
class Assignment:
    """The placement of ``num_clients`` clients in ``num_galaxies`` galaxies with
    the galaxies in ``isolated`` out."""

    num_clients: int
    num_galaxies: int
    isolated: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.num_clients < 1 or self.num_galaxies < 1:
            raise ValueError("need at least one client and one galaxy")
        self.isolated = frozenset(self.isolated)
        if not self.active():
            raise ValueError("every galaxy is isolated: no galaxy is left")

    def active(self) -> list[int]:
        """The galaxies still trusted, in order."""
        return [g for g in range(self.num_galaxies) if g not in self.isolated]

    def home(self, client: int) -> int:
        return client % self.num_galaxies

    def galaxy_of(self, client: int) -> int:
        """``client``'s galaxy now."""
        home = self.home(client)
        if home not in self.isolated:
            return home
        active = self.active()
        return active[client % len(active)]

    def members(self) -> dict[int, list[int]]:
        """The clients of each active galaxy."""
        out: dict[int, list[int]] = {g: [] for g in self.active()}
        for c in range(self.num_clients):
            out[self.galaxy_of(c)].append(c)
        return out

    def sizes(self) -> dict[int, int]:
        """How many clients each galaxy has (0 for an isolated one)."""
        members = self.members()
        return {g: len(members.get(g, [])) for g in range(self.num_galaxies)}

    def moved(self) -> list[int]:
        """Clients whose home galaxy is isolated."""
        return [c for c in range(self.num_clients) if self.home(c) in self.isolated]

    def isolate(self, galaxies: Iterable[int]) -> Assignment:
        """The placement with ``galaxies`` isolated as well."""
        return Assignment(
            self.num_clients, self.num_galaxies, self.isolated | frozenset(galaxies)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_clients": self.num_clients,
            "num_galaxies": self.num_galaxies,
            "isolated": sorted(self.isolated),
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Assignment:
        return cls(
            int(obj["num_clients"]),
            int(obj["num_galaxies"]),
            frozenset(int(g) for g in obj["isolated"]),
        )

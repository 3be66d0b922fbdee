"""The two levels of ProtoGalaxy's Merkle trees.

* Galaxy tree: one leaf per client commitment of the round, leaf data
  :meth:`Commitment.to_bytes`, ordered by ascending ``client_id`` (one commitment
  per client). Queried and proven by client id.
* Global tree: one leaf per galaxy, leaf data :meth:`GalaxyLeaf.to_bytes`
  (``b"PGG1" || u64 round || u64 galaxy_id || u64 tree_size || root[32]``), ordered
  by ascending ``galaxy_id``. Its root and size go into the signed round head.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Final

from protogalaxy.crypto._checks import check_bytes, check_u64
from protogalaxy.crypto.commitment import Commitment
from protogalaxy.crypto.heads import RoundHead
from protogalaxy.crypto.merkle import InclusionProof, MerkleTree

__all__ = ["GalaxyLeaf", "GalaxyTree", "GlobalTree"]

_LEAF: Final = struct.Struct("<4sQQQ32s")
_MAGIC: Final = b"PGG1"


@dataclass(frozen=True, slots=True)
class GalaxyLeaf:
    """A galaxy's entry in the global tree: its root and size in one round."""

    round: int
    galaxy_id: int
    tree_size: int
    root: bytes

    def __post_init__(self) -> None:
        check_u64("round", self.round)
        check_u64("galaxy_id", self.galaxy_id)
        # a galaxy without commitments has no leaf
        check_u64("tree_size", self.tree_size, minimum=1)
        object.__setattr__(self, "root", check_bytes("root", self.root, 32))

    def to_bytes(self) -> bytes:
        return _LEAF.pack(_MAGIC, self.round, self.galaxy_id, self.tree_size, self.root)

    @classmethod
    def from_bytes(cls, data: bytes) -> GalaxyLeaf:
        if len(data) != _LEAF.size:
            raise ValueError(f"galaxy leaf: {len(data)} bytes, expected {_LEAF.size}")
        magic, rnd, gid, size, root = _LEAF.unpack(bytes(data))
        if magic != _MAGIC:
            raise ValueError("galaxy leaf: bad magic")
        return cls(rnd, gid, size, root)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "galaxy_id": self.galaxy_id,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
        }

    @classmethod
    def from_dict(cls, obj: object) -> GalaxyLeaf:
        keys = {"round", "galaxy_id", "tree_size", "root"}
        if (
            not isinstance(obj, dict)
            or set(obj) != keys
            or not isinstance(obj["root"], str)
        ):
            raise ValueError(
                f"galaxy leaf: expected an object with keys {sorted(keys)}"
            )
        return cls(
            obj["round"], obj["galaxy_id"], obj["tree_size"], bytes.fromhex(obj["root"])
        )


class GalaxyTree:
    """The Merkle tree over one galaxy's commitments in one round."""

    def __init__(
        self, commitments: Iterable[Commitment], *, galaxy_id: int, round: int
    ) -> None:
        ordered = sorted(commitments, key=lambda c: c.client_id)
        if not ordered:
            raise ValueError("a galaxy tree needs at least one commitment")
        for prev, cur in pairwise(ordered):
            if prev.client_id == cur.client_id:
                raise ValueError(f"client {cur.client_id} has more than one commitment")
        for c in ordered:
            if not isinstance(c, Commitment):
                raise TypeError(f"expected Commitment, got {type(c).__name__}")
            if c.galaxy_id != galaxy_id or c.round != round:
                raise ValueError(
                    f"commitment of client {c.client_id} is for galaxy {c.galaxy_id} "
                    f"round "
                    f"{c.round}, the tree is for galaxy {galaxy_id} round {round}"
                )
        self.galaxy_id = galaxy_id
        self.round = round
        self.commitments: tuple[Commitment, ...] = tuple(ordered)
        self._index = {c.client_id: i for i, c in enumerate(ordered)}
        self.tree = MerkleTree(c.to_bytes() for c in ordered)

    @property
    def root(self) -> bytes:
        return self.tree.root

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def client_ids(self) -> list[int]:
        return [c.client_id for c in self.commitments]

    def index_of(self, client_id: int) -> int:
        try:
            return self._index[client_id]
        except KeyError:
            raise KeyError(
                f"client {client_id} has no commitment in this tree"
            ) from None

    def commitment_of(self, client_id: int) -> Commitment:
        return self.commitments[self.index_of(client_id)]

    def proof_for(self, client_id: int) -> InclusionProof:
        """The inclusion proof of ``client_id``'s commitment."""
        return self.tree.inclusion_proof(self.index_of(client_id))

    def leaf(self) -> GalaxyLeaf:
        """This galaxy's leaf in the global tree."""
        return GalaxyLeaf(self.round, self.galaxy_id, self.size, self.root)


class GlobalTree:
    """The Merkle tree over the galaxy leaves of one round."""

    def __init__(self, leaves: Iterable[GalaxyLeaf], *, round: int) -> None:
        ordered = sorted(leaves, key=lambda g: g.galaxy_id)
        if not ordered:
            raise ValueError("a global tree needs at least one galaxy leaf")
        for prev, cur in pairwise(ordered):
            if prev.galaxy_id == cur.galaxy_id:
                raise ValueError(f"galaxy {cur.galaxy_id} has more than one leaf")
        for g in ordered:
            if g.round != round:
                raise ValueError(
                    f"galaxy {g.galaxy_id} leaf is for round {g.round}, not {round}"
                )
        self.round = round
        self.leaves: tuple[GalaxyLeaf, ...] = tuple(ordered)
        self._index = {g.galaxy_id: i for i, g in enumerate(ordered)}
        self.tree = MerkleTree(g.to_bytes() for g in ordered)

    @property
    def root(self) -> bytes:
        return self.tree.root

    @property
    def size(self) -> int:
        return self.tree.size

    def leaf_of(self, galaxy_id: int) -> GalaxyLeaf:
        return self.leaves[self._index_of(galaxy_id)]

    def _index_of(self, galaxy_id: int) -> int:
        try:
            return self._index[galaxy_id]
        except KeyError:
            raise KeyError(f"galaxy {galaxy_id} has no leaf in this tree") from None

    def proof_for(self, galaxy_id: int) -> InclusionProof:
        """The inclusion proof of ``galaxy_id``'s leaf."""
        return self.tree.inclusion_proof(self._index_of(galaxy_id))

    def head(self, timestamp_ms: int, *, run: str) -> RoundHead:
        """The (unsigned) round head of this tree in ``run``."""
        return RoundHead(self.round, self.size, self.root, timestamp_ms, run)

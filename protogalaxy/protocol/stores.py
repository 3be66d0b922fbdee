"""Store interfaces of the protocol, and their in-process implementations.

The round state machines in :mod:`protogalaxy.protocol` only talk to these small
interfaces. The simulation uses the in-memory stores below; the services put the same
interfaces on Redis (galaxy) and on a volume (global). Every phase transition is a
compare-and-set, and every write of a client's commitment or reveal is set-if-absent,
so a duplicated or restarted aggregator can neither aggregate a round twice nor
overwrite an accepted update.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from typing import Any

__all__ = ["GalaxyStore", "MemoryGalaxyStore", "Phase", "PhaseClosed", "RevealStage"]


class PhaseClosed(Exception):
    """A commitment or reveal arrived when its round's phase no longer took it."""


class Phase:
    COMMIT = "commit"
    CLOSING = "closing"  # close claimed; the members snapshot is being taken
    COMMITTED = "committed"  # root sent, waiting for the signed round head
    REVEAL = "reveal"
    AGGREGATING = "aggregating"
    DONE = "done"


State = tuple[int, str]


class RevealStage(ABC):
    """A reveal's body written to the store while it still arrives, before it is
    verified. Nothing of it is a reveal until :meth:`GalaxyStore.add_reveal` commits
    it (``staged=``); until then :meth:`discard` forgets it.

    :meth:`write` and :meth:`flush` are called from one thread at a time, in order.
    """

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the staged body (it may be sent on, not yet stored)."""

    @abstractmethod
    def flush(self) -> int:
        """Wait until every write is stored; the staged body's length."""

    @abstractmethod
    def discard(self) -> None:
        """Forget the staged body; idempotent, and a no-op once committed."""


class GalaxyStore(ABC):
    """Everything a galaxy aggregator keeps, per galaxy."""

    @abstractmethod
    def get_state(self) -> State | None:
        """The current ``(round, phase)``, or None before the first round."""

    @abstractmethod
    def compare_and_set_state(self, expected: State | None, new: State) -> bool:
        """Atomically move from ``expected`` to ``new``; False if the state differs."""

    @abstractmethod
    def register_client(self, client: int, public_key: bytes) -> bool:
        """Register a key; True if new or identical to the registered one."""

    @abstractmethod
    def client_key(self, client: int) -> bytes | None: ...

    @abstractmethod
    def clients(self) -> list[int]:
        """Every registered client id."""

    @abstractmethod
    def add_commitment(
        self, round: int, client: int, commitment: bytes, signature: bytes
    ) -> bool:
        """Set-if-absent, and only while the state is ``(round, commit)``: the check
        and the write are one atomic step, so every stored commitment is in the
        members snapshot the close takes after claiming the phase.

        Returns False when the client already committed this round; raises
        :class:`PhaseClosed` when the round is not taking commitments.
        """

    @abstractmethod
    def commitments(self, round: int) -> dict[int, tuple[bytes, bytes]]: ...

    @abstractmethod
    def commitment_count(self, round: int) -> int:
        """How many clients committed in ``round``, without reading them (the
        quorum is checked after every request)."""

    @abstractmethod
    def stage_reveal(
        self, round: int, client: int, size: int | None = None
    ) -> RevealStage:
        """A fresh stage for one upload of ``client``'s reveal in ``round``, of
        ``size`` bytes when the caller knows (the store may reserve them)."""

    @abstractmethod
    def add_reveal(
        self,
        round: int,
        client: int,
        body: bytes | memoryview,
        nonce: bytes,
        *,
        staged: RevealStage | None = None,
    ) -> bool:
        """Set-if-absent, and only while the state is ``(round, reveal)``, atomically
        with that check, so every stored reveal is in the aggregate of the close.

        With ``staged`` (every byte of ``body`` written to it, in order) the store
        commits the staged copy instead of writing ``body`` again. A staged body of
        another length is a fault of the store, not of the client: ``RuntimeError``,
        nothing written. The stage is used up either way.

        A client has one fate a round: an accepted reveal or a rejection, never
        both (a valid and an invalid reveal racing each other), decided atomically
        with the write.

        Returns False when the client already revealed this round, or its reveal
        was rejected; raises :class:`PhaseClosed` when the round is not taking
        reveals.
        """

    @abstractmethod
    def reveals(self, round: int) -> dict[int, tuple[bytes, bytes]]: ...

    @abstractmethod
    def get_reveal(self, round: int, client: int) -> tuple[bytes, bytes] | None:
        """One client's reveal, without fetching the others' (they can be large)."""

    @abstractmethod
    def reveal_count(self, round: int) -> int: ...

    @abstractmethod
    def add_rejection(self, round: int, client: int, reason: str) -> bool:
        """Record a layer-1 rejection (first one per client and round wins), only
        while the state is ``(round, reveal)`` and atomically with that check: the
        close reads the rejections once, so a later one would cost the client
        nothing while its answer said it did.

        Returns False (nothing written) when the client already has a rejection or
        an accepted reveal this round: one fate per client. Raises
        :class:`PhaseClosed` when the round is not taking reveals.
        """

    @abstractmethod
    def rejections(self, round: int) -> dict[int, str]: ...

    @abstractmethod
    def rejection_count(self, round: int) -> int: ...

    @abstractmethod
    def is_rejected(self, round: int, client: int) -> bool: ...

    @abstractmethod
    def put_blob(self, round: int, key: str, value: bytes) -> None: ...

    @abstractmethod
    def get_blob(self, round: int, key: str) -> bytes | None: ...

    @abstractmethod
    def put_meta(self, key: str, value: bytes) -> None:
        """Galaxy-wide (not per-round) bookkeeping, e.g. who missed rounds."""

    @abstractmethod
    def get_meta(self, key: str) -> bytes | None: ...

    @abstractmethod
    def save_reputation(self, state: dict[str, Any]) -> None:
        """Replace the reputation state (and bump :meth:`reputation_version`)."""

    @abstractmethod
    def load_reputation(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def reputation_version(self) -> int:
        """A counter every reputation write bumps: a replica that holds the state
        of another version reloads it before using it."""

    @abstractmethod
    def finish_round(
        self,
        round: int,
        *,
        blobs: dict[str, bytes],
        reputation: dict[str, Any],
        evidence: list[dict[str, Any]],
    ) -> bool:
        """Everything a close produces, in one atomic step, only while the state
        is ``(round, aggregating)``: the round's blobs, the new reputation state,
        the evidence records, and the move to ``(round, done)``.

        A close killed before this step left nothing behind, so it can be run
        again from the stored reveals; one racing another replica's close of the
        same round writes nothing. Returns False (nothing written) when the
        state is not ``(round, aggregating)``.
        """

    @abstractmethod
    def append_evidence(self, record: dict[str, Any]) -> None: ...

    @abstractmethod
    def evidence(self, client: int | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def drop_round(self, round: int) -> None:
        """Forget a finished round's commitments, reveals and blobs."""

    @abstractmethod
    def drop_rounds_before(self, round: int) -> None:
        """Forget every round before ``round``, whichever this galaxy took part in
        (a galaxy that skipped rounds has no single round to drop)."""

    @abstractmethod
    def drop_stages(self, round: int) -> None:
        """Forget the round's staged uploads (left by an upload whose process was
        killed; a live upload's commit then fails as it would after the close)."""


class _MemoryStage(RevealStage):
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.data += data

    def flush(self) -> int:
        return len(self.data)

    def discard(self) -> None:
        self.data = bytearray()


class MemoryGalaxyStore(GalaxyStore):
    """In-process store (thread-safe) for the simulation and the contract tests."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._state: State | None = None
        self._keys: dict[int, bytes] = {}
        self._commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._reveals: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._rejections: dict[int, dict[int, str]] = {}
        self._blobs: dict[tuple[int, str], bytes] = {}
        self._meta: dict[str, bytes] = {}
        self._reputation: dict[str, Any] | None = None
        self._reputation_version = 0
        self._evidence: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._lock = threading.RLock()

    def get_state(self) -> State | None:
        return self._state

    def compare_and_set_state(self, expected: State | None, new: State) -> bool:
        with self._lock:
            if self._state != expected:
                return False
            self._state = new
            return True

    def register_client(self, client: int, public_key: bytes) -> bool:
        with self._lock:
            known = self._keys.setdefault(client, bytes(public_key))
            return known == bytes(public_key)

    def client_key(self, client: int) -> bytes | None:
        return self._keys.get(client)

    def clients(self) -> list[int]:
        return sorted(self._keys)

    def _set_if_absent(
        self, table: dict[int, dict[int, Any]], round: int, client: int, value: Any
    ) -> bool:
        with self._lock:
            per_round = table.setdefault(round, {})
            if client in per_round:
                return False
            per_round[client] = value
            return True

    def add_commitment(
        self, round: int, client: int, commitment: bytes, signature: bytes
    ) -> bool:
        with self._lock:
            if self._state != (round, Phase.COMMIT):
                raise PhaseClosed(f"round {round} is at {self._state}")
            return self._set_if_absent(
                self._commitments, round, client, (commitment, signature)
            )

    def commitments(self, round: int) -> dict[int, tuple[bytes, bytes]]:
        return dict(self._commitments.get(round, {}))

    def commitment_count(self, round: int) -> int:
        return len(self._commitments.get(round, {}))

    def stage_reveal(
        self, round: int, client: int, size: int | None = None
    ) -> RevealStage:
        return _MemoryStage()

    def add_reveal(
        self,
        round: int,
        client: int,
        body: bytes | memoryview,
        nonce: bytes,
        *,
        staged: RevealStage | None = None,
    ) -> bool:
        if staged is not None:
            assert isinstance(staged, _MemoryStage)
            held, staged.data = bytes(staged.data), bytearray()
            if len(held) != len(body):
                raise RuntimeError(f"staged {len(held)} bytes, body has {len(body)}")
            body = held
        with self._lock:
            if self._state != (round, Phase.REVEAL):
                raise PhaseClosed(f"round {round} is at {self._state}")
            if client in self._rejections.get(round, {}):
                return False
            return self._set_if_absent(
                self._reveals, round, client, (bytes(body), bytes(nonce))
            )

    def reveals(self, round: int) -> dict[int, tuple[bytes, bytes]]:
        return dict(self._reveals.get(round, {}))

    def get_reveal(self, round: int, client: int) -> tuple[bytes, bytes] | None:
        return self._reveals.get(round, {}).get(client)

    def reveal_count(self, round: int) -> int:
        return len(self._reveals.get(round, {}))

    def add_rejection(self, round: int, client: int, reason: str) -> bool:
        with self._lock:
            if self._state != (round, Phase.REVEAL):
                raise PhaseClosed(f"round {round} is at {self._state}")
            if client in self._reveals.get(round, {}):
                return False
            return self._set_if_absent(self._rejections, round, client, reason)

    def rejections(self, round: int) -> dict[int, str]:
        return dict(self._rejections.get(round, {}))

    def rejection_count(self, round: int) -> int:
        return len(self._rejections.get(round, {}))

    def is_rejected(self, round: int, client: int) -> bool:
        return client in self._rejections.get(round, {})

    def put_blob(self, round: int, key: str, value: bytes) -> None:
        self._blobs[(round, key)] = bytes(value)

    def get_blob(self, round: int, key: str) -> bytes | None:
        return self._blobs.get((round, key))

    def put_meta(self, key: str, value: bytes) -> None:
        self._meta[key] = bytes(value)

    def get_meta(self, key: str) -> bytes | None:
        return self._meta.get(key)

    def save_reputation(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._reputation = _copy(state)
            self._reputation_version += 1

    def load_reputation(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._reputation is None else _copy(self._reputation)

    def reputation_version(self) -> int:
        return self._reputation_version

    def finish_round(
        self,
        round: int,
        *,
        blobs: dict[str, bytes],
        reputation: dict[str, Any],
        evidence: list[dict[str, Any]],
    ) -> bool:
        with self._lock:
            if self._state != (round, Phase.AGGREGATING):
                return False
            for key, value in blobs.items():
                self._blobs[(round, key)] = bytes(value)
            self.save_reputation(reputation)
            self._evidence.extend(_copy(e) for e in evidence)
            self._state = (round, Phase.DONE)
            return True

    def append_evidence(self, record: dict[str, Any]) -> None:
        self._evidence.append(record)

    def evidence(self, client: int | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self._evidence if client is None or e.get("client") == client
        ]

    def drop_round(self, round: int) -> None:
        with self._lock:
            self._commitments.pop(round, None)
            self._reveals.pop(round, None)
            self._rejections.pop(round, None)
            for key in [k for k in self._blobs if k[0] == round]:
                del self._blobs[key]

    def drop_rounds_before(self, round: int) -> None:
        with self._lock:
            held = set(self._commitments) | set(self._reveals) | set(self._rejections)
            held |= {k[0] for k in self._blobs}
            for rnd in sorted(r for r in held if r < round):
                self.drop_round(rnd)

    def drop_stages(self, round: int) -> None:
        pass  # a memory stage lives only as long as its upload


def _copy(state: Any) -> Any:
    """A deep copy as a store keeps it (JSON): nothing shared with the caller."""
    return json.loads(json.dumps(state, default=str))

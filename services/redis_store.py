"""The galaxy store on Redis: the same contract as the in-memory store.

Keys live under ``{prefix}`` (default ``pg:galaxy:<id>:``), so one Redis can hold
many galaxies and an ACL user per galaxy can be limited to its own prefix:

=============================  ===============================================
``state``                      ``"<round>:<phase>"``; changed only by a Lua CAS
``keys``                       hash client -> Ed25519 public key
``r:<round>:commitments``      hash client -> commitment (68 B) || signature; written
                               by a script only while the round takes commitments
``r:<round>:reveals``          hash client -> nonce (32 B): the revealed clients
``r:<round>:reveal:<client>``  the revealed PGT1 body, as received
``r:<round>:stage:<client>:*``  a body being uploaded, before it is verified; renamed
                               to ``reveal:<client>`` when accepted, else deleted
``r:<round>:rejections``       hash client -> layer-1 reason; written by the same
                               script, only while the round takes reveals
``r:<round>:blob:<name>``      leaf, head, galaxy proof, aggregate
``meta:<name>``                 galaxy-wide bookkeeping (e.g. rounds each client missed)
``reputation``                 JSON of the reputation tracker
``reputation_version``         bumped with every write of ``reputation``
``evidence``                   list of JSON records (quarantines and bans)
=============================  ===============================================

Every per-client write is set-if-absent (``HSETNX``; a reveal's body and nonce go
together in one ``MULTI`` or script) and every phase change a compare-and-set
script, so two replicas or a restarted pod can neither aggregate a round twice nor
overwrite an accepted update.

A reveal's body is streamed into a stage key with pipelined ``SETRANGE`` while the
request is still arriving (:class:`RedisRevealStage`), so Redis stores and logs it
(AOF) in parallel with the transfer; accepting it is then one O(1) ``RENAME`` in a
script. Besides starting late (only once the body was verified), one 45 MB ``SET``
with AOF on cost Redis about 170 ms of CPU here, against about 50 ms for the same
bytes in 1 MB pieces of a string reserved at its full size.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

import redis

from protogalaxy.crypto.commitment import COMMITMENT_SIZE
from protogalaxy.protocol.stores import (
    GalaxyStore,
    Phase,
    PhaseClosed,
    RevealStage,
    State,
)

__all__ = ["RedisGalaxyStore", "RedisRevealStage"]

_CAS = """
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: state, hash; ARGV: state, field, value. HSETNX only in that state.
_ADD_IF_STATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
"""

# KEYS: state, reveals (nonces), reveal body, stage, rejections; ARGV: state,
# client, nonce, length. The stage is used up whatever the outcome; a client with a
# rejection this round cannot also have a reveal (one fate per client).
_COMMIT_STAGE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('UNLINK', KEYS[4])
  return -1
end
if redis.call('STRLEN', KEYS[4]) ~= tonumber(ARGV[4]) then
  redis.call('UNLINK', KEYS[4])
  return -2
end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1
    or redis.call('EXISTS', KEYS[3]) == 1
    or redis.call('HEXISTS', KEYS[5], ARGV[2]) == 1 then
  redis.call('UNLINK', KEYS[4])
  return 0
end
redis.call('RENAME', KEYS[4], KEYS[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: state, rejections, reveals (nonces), reveal body; ARGV: state, client,
# record. A rejection only for a client with no accepted reveal this round.
_ADD_REJECTION = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1
    or redis.call('EXISTS', KEYS[4]) == 1 then
  return 0
end
return redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
"""

_REGISTER = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 1 end
return 0
"""


def _encode_state(state: State | None) -> bytes:
    return b"" if state is None else f"{state[0]}:{state[1]}".encode()


def _decode_state(raw: bytes | None) -> State | None:
    if raw is None:
        return None
    rnd, _, phase = raw.decode().partition(":")
    return int(rnd), phase


class RedisRevealStage(RevealStage):
    """A body streamed into a stage key, each :meth:`write` sent on a connection of
    its own without waiting for the reply; :meth:`flush` reads the replies. The
    caller batches writes (about 1 MB each is the sweet spot).

    With the size known, the string is reserved ahead of the writes (``SETRANGE`` at
    the last byte of the reservation) and each write fills its place (``SETRANGE``).
    The reservation doubles as the body arrives (at least 1 MiB, at most the size),
    so Redis holds at most twice what was sent, never the whole declared size on
    the first piece (a sender could otherwise make it hold 64 MiB for a few bytes),
    and reallocates only about log2(size / 1 MiB) times. Growing it by ``APPEND``
    reallocates and copies it over and over, which costs Redis about three times
    the CPU for 45 MB; that is the way without a size.
    """

    #: the first reservation
    FIRST: int = 1 << 20

    def __init__(self, client: Any, key: str, size: int | None = None) -> None:
        self._r = client
        self.key = key
        self.size = size
        self._conn: Any = None
        self._pending = 0  # commands sent whose reply is unread
        self._length = 0
        self._reserved = 0
        self.done = False  # committed or discarded
        # Held while the stage is committed: a discard from another thread (a
        # request's clean-up) waits for the commit instead of cutting into it.
        self.lock = threading.RLock()

    def write(self, data: bytes | memoryview) -> None:
        if self.done:
            raise RuntimeError("write to a used stage")
        end = self._length + len(data)
        if self.size is not None and end > self.size:
            raise RuntimeError(f"stage {self.key} is {self.size} bytes, got {end}")
        try:
            if self._conn is None:
                self._conn = self._r.connection_pool.get_connection()
            if self.size and end > self._reserved:
                grown = min(self.size, max(end, 2 * self._reserved, self.FIRST))
                self._send("SETRANGE", self.key, grown - 1, b"\0")
                self._reserved = grown
            if self.size is None:
                self._send("APPEND", self.key, data)
            else:
                self._send("SETRANGE", self.key, self._length, data)
        except BaseException:
            self._drop_connection()
            raise
        self._length = end

    def _send(self, *command: Any) -> None:
        self._conn.send_command(*command)
        self._pending += 1

    def flush(self) -> int:
        if self.size is not None and self._length != self.size:
            raise RuntimeError(
                f"stage {self.key} got {self._length} of {self.size} bytes"
            )
        if self._conn is None:
            return self._length
        stored = self._length
        try:
            while self._pending:
                stored = self._conn.read_response()  # an error reply raises
                self._pending -= 1
        except BaseException:
            self._drop_connection()
            raise
        self._r.connection_pool.release(self._conn)
        self._conn = None
        if int(stored) != self._length:
            raise RuntimeError(
                f"stage {self.key} holds {stored} bytes, not {self._length}"
            )
        return self._length

    def discard(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            self._drop_connection()
            self._r.unlink(self.key)

    def _drop_connection(self) -> None:
        # Replies may be unread: the connection cannot go back to the pool.
        if self._conn is not None:
            self._conn.disconnect()
            self._r.connection_pool.release(self._conn)
            self._conn = None
            self._pending = 0


class RedisGalaxyStore(GalaxyStore):
    """:class:`GalaxyStore` on a Redis server (binary-safe, no decoded responses)."""

    def __init__(
        self, client: redis.Redis, *, galaxy: int, prefix: str | None = None
    ) -> None:
        self.r: Any = client  # binary responses; redis-py types them as bytes | str
        self.prefix = prefix if prefix is not None else f"pg:galaxy:{galaxy}:"
        self._cas = self.r.register_script(_CAS)
        self._register = self.r.register_script(_REGISTER)
        self._add_if_state = self.r.register_script(_ADD_IF_STATE)
        self._commit_stage = self.r.register_script(_COMMIT_STAGE)
        self._add_rejection = self.r.register_script(_ADD_REJECTION)

    @classmethod
    def from_url(
        cls, url: str, *, galaxy: int, prefix: str | None = None
    ) -> RedisGalaxyStore:
        return cls(
            redis.Redis.from_url(url, decode_responses=False),
            galaxy=galaxy,
            prefix=prefix,
        )

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def ping(self) -> bool:
        return bool(self.r.ping())

    # -- round state -----------------------------------------------------------

    def get_state(self) -> State | None:
        return _decode_state(self.r.get(self._k("state")))

    def compare_and_set_state(self, expected: State | None, new: State) -> bool:
        done = self._cas(
            keys=[self._k("state")], args=[_encode_state(expected), _encode_state(new)]
        )
        return bool(done)

    # -- clients ---------------------------------------------------------------

    def register_client(self, client: int, public_key: bytes) -> bool:
        return bool(
            self._register(keys=[self._k("keys")], args=[client, bytes(public_key)])
        )

    def client_key(self, client: int) -> bytes | None:
        value = self.r.hget(self._k("keys"), str(client))
        return None if value is None else bytes(value)

    def clients(self) -> list[int]:
        return sorted(int(c) for c in self.r.hkeys(self._k("keys")))

    # -- per-round data ----------------------------------------------------------

    def add_commitment(
        self, round: int, client: int, commitment: bytes, signature: bytes
    ) -> bool:
        added = self._add_if_state(
            keys=[self._k("state"), self._k("r", round, "commitments")],
            args=[
                _encode_state((round, Phase.COMMIT)),
                str(client),
                bytes(commitment) + bytes(signature),
            ],
        )
        if added < 0:
            raise PhaseClosed(f"round {round} is not taking commitments")
        return bool(added)

    def commitments(self, round: int) -> dict[int, tuple[bytes, bytes]]:
        raw = self.r.hgetall(self._k("r", round, "commitments"))
        return {
            int(c): (bytes(v[:COMMITMENT_SIZE]), bytes(v[COMMITMENT_SIZE:]))
            for c, v in raw.items()
        }

    def stage_reveal(
        self, round: int, client: int, size: int | None = None
    ) -> RedisRevealStage:
        token = secrets.token_hex(8)  # concurrent uploads never share a stage
        key = self._k("r", round, "stage", client, token)
        return RedisRevealStage(self.r, key, size)

    def add_reveal(
        self,
        round: int,
        client: int,
        body: bytes | memoryview,
        nonce: bytes,
        *,
        staged: RevealStage | None = None,
    ) -> bool:
        if staged is not None and len(body):
            return self._add_staged(round, client, len(body), nonce, staged)
        if staged is not None:  # an empty body has no stage key: write it as is
            try:
                if staged.flush():
                    raise RuntimeError(f"a stage of {len(body)} bytes holds more")
            finally:
                staged.discard()
        # The body goes in a key of its own, so neither side copies 45 MB to glue
        # the nonce to it. WATCH makes the MULTI conditional on the phase without
        # passing the body through a script: if the state changes before EXEC,
        # nothing is written.
        # The rejections hash is watched too: one fate per client.
        state_key = self._k("state")
        rejections = self._k("r", round, "rejections")
        for _ in range(64):  # another client's rejection also changes the hash
            with self.r.pipeline(transaction=True) as pipe:
                pipe.watch(state_key, rejections)
                if pipe.get(state_key) != _encode_state((round, Phase.REVEAL)):
                    raise PhaseClosed(f"round {round} is not taking reveals")
                if pipe.hexists(rejections, str(client)):
                    return False
                pipe.multi()
                pipe.set(self._k("r", round, "reveal", client), body, nx=True)
                pipe.hsetnx(self._k("r", round, "reveals"), str(client), bytes(nonce))
                try:
                    _, added = pipe.execute()
                except redis.WatchError:
                    continue
            return bool(added)
        raise PhaseClosed(f"round {round}: the reveal could not be written")

    def _add_staged(
        self, round: int, client: int, length: int, nonce: bytes, staged: RevealStage
    ) -> bool:
        assert isinstance(staged, RedisRevealStage)
        with staged.lock:
            added = self._commit_staged(round, client, length, nonce, staged)
        if added == -1:
            raise PhaseClosed(f"round {round} is not taking reveals")
        if added == -2:
            raise RuntimeError(f"stage {staged.key} does not hold {length} bytes")
        return bool(added)

    def _commit_staged(
        self,
        round: int,
        client: int,
        length: int,
        nonce: bytes,
        staged: RedisRevealStage,
    ) -> int:
        if staged.done:
            raise RuntimeError(f"stage {staged.key} was discarded")
        try:
            if staged.flush() != length:
                raise RuntimeError(f"stage {staged.key} does not hold {length} bytes")
            added = self._commit_stage(
                keys=[
                    self._k("state"),
                    self._k("r", round, "reveals"),
                    self._k("r", round, "reveal", client),
                    staged.key,
                    self._k("r", round, "rejections"),
                ],
                args=[
                    _encode_state((round, Phase.REVEAL)),
                    str(client),
                    bytes(nonce),
                    length,
                ],
            )
            staged.done = True  # the script used the stage up, whatever it answered
        finally:
            staged.discard()  # a no-op once the script ran
        return int(added)

    def reveals(self, round: int) -> dict[int, tuple[bytes, bytes]]:
        nonces = self.r.hgetall(self._k("r", round, "reveals"))
        clients = sorted(int(c) for c in nonces)
        if not clients:
            return {}
        bodies = self.r.mget([self._k("r", round, "reveal", c) for c in clients])
        return {
            c: (bytes(b), bytes(nonces[str(c).encode()]))
            for c, b in zip(clients, bodies, strict=True)
            if b is not None
        }

    def get_reveal(self, round: int, client: int) -> tuple[bytes, bytes] | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self._k("r", round, "reveals"), str(client))
        pipe.get(self._k("r", round, "reveal", client))
        nonce, body = pipe.execute()
        return None if nonce is None or body is None else (bytes(body), bytes(nonce))

    def reveal_count(self, round: int) -> int:
        return int(self.r.hlen(self._k("r", round, "reveals")))

    def add_rejection(self, round: int, client: int, reason: str) -> bool:
        added = self._add_rejection(
            keys=[
                self._k("state"),
                self._k("r", round, "rejections"),
                self._k("r", round, "reveals"),
                self._k("r", round, "reveal", client),
            ],
            args=[_encode_state((round, Phase.REVEAL)), str(client), reason],
        )
        if added < 0:
            raise PhaseClosed(f"round {round} is not taking reveals")
        return bool(added)

    def rejections(self, round: int) -> dict[int, str]:
        raw = self.r.hgetall(self._k("r", round, "rejections"))
        return {int(c): v.decode() for c, v in raw.items()}

    def put_blob(self, round: int, key: str, value: bytes) -> None:
        self.r.set(self._k("r", round, "blob", key), bytes(value))

    def get_blob(self, round: int, key: str) -> bytes | None:
        value = self.r.get(self._k("r", round, "blob", key))
        return None if value is None else bytes(value)

    def put_meta(self, key: str, value: bytes) -> None:
        self.r.set(self._k("meta", key), bytes(value))

    def get_meta(self, key: str) -> bytes | None:
        value = self.r.get(self._k("meta", key))
        return None if value is None else bytes(value)

    # -- reputation and evidence ---------------------------------------------------

    def save_reputation(self, state: dict[str, Any]) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._k("reputation"), json.dumps(state))
            pipe.incr(self._k("reputation_version"))
            pipe.execute()

    def reputation_version(self) -> int:
        return int(self.r.get(self._k("reputation_version")) or 0)

    def finish_round(
        self,
        round: int,
        *,
        blobs: dict[str, bytes],
        reputation: dict[str, Any],
        evidence: list[dict[str, Any]],
    ) -> bool:
        state_key = self._k("state")
        expected = _encode_state((round, Phase.AGGREGATING))
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                pipe.watch(state_key)
                if pipe.get(state_key) != expected:
                    return False
                pipe.multi()
                for key, value in blobs.items():
                    pipe.set(self._k("r", round, "blob", key), bytes(value))
                pipe.set(self._k("reputation"), json.dumps(reputation))
                pipe.incr(self._k("reputation_version"))
                if evidence:
                    pipe.rpush(
                        self._k("evidence"),
                        *(json.dumps(e, default=str) for e in evidence),
                    )
                pipe.set(state_key, _encode_state((round, Phase.DONE)))
                try:
                    pipe.execute()
                except redis.WatchError:
                    continue  # the state moved: look again
                return True

    def load_reputation(self) -> dict[str, Any] | None:
        raw = self.r.get(self._k("reputation"))
        if raw is None:
            return None
        state: dict[str, Any] = json.loads(raw)
        return state

    def append_evidence(self, record: dict[str, Any]) -> None:
        self.r.rpush(self._k("evidence"), json.dumps(record, default=str))

    def evidence(self, client: int | None = None) -> list[dict[str, Any]]:
        records = [json.loads(x) for x in self.r.lrange(self._k("evidence"), 0, -1)]
        return [e for e in records if client is None or e.get("client") == client]

    def drop_round(self, round: int) -> None:
        self._drop(self._k("r", round, "*"))

    def drop_rounds_before(self, round: int) -> None:
        start = len(self._k("r", ""))
        doomed = []
        for key in self.r.scan_iter(match=self._k("r", "*"), count=1000):
            number = bytes(key)[start:].split(b":", 1)[0]
            if number.isdigit() and int(number) < round:
                doomed.append(key)
        for i in range(0, len(doomed), 1000):
            self.r.unlink(*doomed[i : i + 1000])

    def drop_stages(self, round: int) -> None:
        self._drop(self._k("r", round, "stage", "*"))

    def _drop(self, pattern: str) -> None:
        keys = list(self.r.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            self.r.unlink(*keys[i : i + 1000])

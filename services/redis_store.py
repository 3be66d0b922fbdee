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
``r:<round>:rejections``       hash client -> layer-1 reason
``r:<round>:blob:<name>``      leaf, head, galaxy proof, aggregate
``reputation``                 JSON of the reputation tracker
``evidence``                   list of JSON records (quarantines and bans)
=============================  ===============================================

Every per-client write is set-if-absent (``HSETNX``; a reveal's body and nonce go
together in one ``MULTI``) and every phase change a compare-and-set script, so two
replicas or a restarted pod can neither aggregate a round twice nor overwrite an
accepted update.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from protogalaxy.crypto.commitment import COMMITMENT_SIZE
from protogalaxy.protocol.stores import GalaxyStore, Phase, PhaseClosed, State

__all__ = ["RedisGalaxyStore"]

_CAS = """
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_ADD_COMMITMENT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
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


class RedisGalaxyStore(GalaxyStore):
    """:class:`GalaxyStore` on a Redis server (binary-safe, no decoded responses)."""

    def __init__(
        self, client: redis.Redis, *, galaxy: int, prefix: str | None = None
    ) -> None:
        self.r: Any = client  # binary responses; redis-py types them as bytes | str
        self.prefix = prefix if prefix is not None else f"pg:galaxy:{galaxy}:"
        self._cas = self.r.register_script(_CAS)
        self._register = self.r.register_script(_REGISTER)
        self._add_commitment = self.r.register_script(_ADD_COMMITMENT)

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
        added = self._add_commitment(
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

    def add_reveal(
        self, round: int, client: int, body: bytes | memoryview, nonce: bytes
    ) -> bool:
        # The body goes in a key of its own, so neither side copies 45 MB to glue
        # the nonce to it. WATCH makes the MULTI conditional on the phase without
        # passing the body through a script: if the state changes before EXEC,
        # nothing is written.
        state_key = self._k("state")
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(state_key)
            if pipe.get(state_key) != _encode_state((round, Phase.REVEAL)):
                raise PhaseClosed(f"round {round} is not taking reveals")
            pipe.multi()
            pipe.set(self._k("r", round, "reveal", client), body, nx=True)
            pipe.hsetnx(self._k("r", round, "reveals"), str(client), bytes(nonce))
            try:
                _, added = pipe.execute()
            except redis.WatchError:
                raise PhaseClosed(f"round {round}: the phase changed") from None
        return bool(added)

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
        return bool(
            self.r.hsetnx(self._k("r", round, "rejections"), str(client), reason)
        )

    def rejections(self, round: int) -> dict[int, str]:
        raw = self.r.hgetall(self._k("r", round, "rejections"))
        return {int(c): v.decode() for c, v in raw.items()}

    def put_blob(self, round: int, key: str, value: bytes) -> None:
        self.r.set(self._k("r", round, "blob", key), bytes(value))

    def get_blob(self, round: int, key: str) -> bytes | None:
        value = self.r.get(self._k("r", round, "blob", key))
        return None if value is None else bytes(value)

    # -- reputation and evidence ---------------------------------------------------

    def save_reputation(self, state: dict[str, Any]) -> None:
        self.r.set(self._k("reputation"), json.dumps(state))

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
        keys = list(self.r.scan_iter(match=self._k("r", round, "*")))
        if keys:
            self.r.delete(*keys)

"""The galaxy store on Redis: the same contract as the in-memory store.

Keys live under ``{prefix}``: ``pg:galaxy:<id>:<run>:`` for a run's store
(:meth:`RedisGalaxyStore.from_url` with ``run=``), so one Redis can hold many
galaxies and runs, and an ACL user per galaxy can be limited to ``pg:galaxy:<id>:*``:

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

Every key a store writes can be named without listing the keyspace, so the
galaxy's ACL user needs neither ``SCAN`` nor ``KEYS`` (and cannot list other
galaxies' key names). Names that are not fixed are kept in small index sets,
written in the same step as the key they name (``MULTI``, or the same script):

=============================  ===============================================
``stages``                     the stage keys of uploads in flight (any round);
                               empty, and so absent, when no upload runs
``r:<round>:blobs``            the names of the round's blobs
``metas``                      the names of the ``meta:`` keys
``gc_floor``                   every round below it is already dropped
=============================  ===============================================

The reveal bodies of a round are named by the clients in its ``commitments`` and
``reveals`` hashes, and the rounds of a run go from 0 to the round in ``state`` (it
only moves forward). So dropping a round, or a whole run, reads a few hashes and
sets and unlinks the names they give.

Runs: ``pg:galaxy:<id>:runs`` is a hash run id -> the order in which this galaxy
started it. :meth:`RedisGalaxyStore.begin_run` registers the store's run there and
deletes the keys of every run started before it (they stay in the hash, so a pod
of an old run that comes back cannot pass for the newest one:
:class:`RunSuperseded`).

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

Redis runs with ``maxmemory-policy noeviction``: a write it has no memory for is
refused (:class:`redis.exceptions.OutOfMemoryError`) rather than evicting another
key, and deletes still work, so dropping old rounds frees memory.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
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

__all__ = ["RedisGalaxyStore", "RedisRevealStage", "RunSuperseded", "connect"]

#: a run id: it becomes part of key names (and, elsewhere, of paths and Job names)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: keys unlinked per command when a round or a run is dropped
_BATCH = 1000

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

# KEYS: state, reveals (nonces), reveal body, stage, rejections, stages index;
# ARGV: state, client, nonce, length. The stage is used up whatever the outcome
# (and leaves the index); a client with a rejection this round cannot also have a
# reveal (one fate per client).
_COMMIT_STAGE = """
redis.call('SREM', KEYS[6], KEYS[4])
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

# KEYS: the galaxy's runs hash; ARGV: this run. Registers the run (once, as the
# newest so far) and answers every run with its order.
_BEGIN_RUN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], redis.call('HLEN', KEYS[1]) + 1)
end
return redis.call('HGETALL', KEYS[1])
"""


class RunSuperseded(RuntimeError):
    """This galaxy already started a newer run: the store's run is over (and its
    keys may be deleted), so it must not be served again."""


def _encode_state(state: State | None) -> bytes:
    return b"" if state is None else f"{state[0]}:{state[1]}".encode()


def _decode_state(raw: bytes | None) -> State | None:
    if raw is None:
        return None
    rnd, _, phase = raw.decode().partition(":")
    return int(rnd), phase


def _quiet() -> dict[str, Any]:
    """Client options that keep redis-py from sending ``CLIENT SETINFO`` on
    connect: a galaxy's ACL user is allowed no ``CLIENT`` subcommand."""
    try:
        from redis.driver_info import DriverInfo  # noqa: F401  (redis-py >= 7)
    except ImportError:
        return {"lib_name": None, "lib_version": None}
    return {"driver_info": None}


def _without_password(url: str, password: str) -> str:
    """``url`` without ``password`` where it stands in the URL's user info.

    The chart writes ``redis://<user>:$(PG_REDIS_PASSWORD)@host...``: Kubernetes
    puts the password in verbatim, not URL-encoded, so a password with ``@``, ``/``
    or ``%`` would not parse. Knowing it, the galaxy takes it out again and sends it
    as it is."""
    scheme, sep, rest = url.partition("://")
    user, colon, tail = rest.partition(":")
    if not colon or "@" in user or "/" in user or not tail.startswith(password + "@"):
        return url
    host = tail[len(password) + 1 :]
    return f"{scheme}{sep}{user}@{host}" if user else f"{scheme}{sep}{host}"


def connect(
    url: str, *, password: str | None = None, ca_file: str | None = None
) -> redis.Redis:
    """A binary-safe client of the Redis at ``url``.

    ``password``: used when the URL carries none (it then need not be
    URL-encoded); ``ca_file``: the CA that signed the server's certificate, for a
    ``rediss://`` URL (e.g. Memorystore's server CA).
    """
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://")):
        raise ValueError(
            f"PG_REDIS_URL must be a redis:// or rediss:// URL, got {url!r}"
        )
    options: dict[str, Any] = {"decode_responses": False, **_quiet()}
    if password:
        url = _without_password(url, password)
        options["password"] = password
    if ca_file:
        if not url.startswith("rediss://"):
            raise ValueError(
                "PG_REDIS_CA_FILE is set but PG_REDIS_URL is not a rediss:// URL:"
                " a CA is only used over TLS"
            )
        if not Path(ca_file).is_file():
            raise ValueError(f"PG_REDIS_CA_FILE {ca_file!r} is not a readable file")
        options["ssl_ca_certs"] = ca_file
    return redis.Redis.from_url(url, **options)


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

    ``index``: a set the stage key is added to before its first byte is written
    and removed from when the stage is used up, so a stage left by a killed
    process can be found without listing the keyspace.
    """

    #: the first reservation
    FIRST: int = 1 << 20

    def __init__(
        self,
        client: Any,
        key: str,
        size: int | None = None,
        *,
        index: str | None = None,
    ) -> None:
        self._r = client
        self.key = key
        self.size = size
        self.index = index
        self._conn: Any = None
        self._pending = 0  # commands sent whose reply is unread
        self._length = 0
        self._reserved = 0
        self._indexed = False
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
            if self.index is not None and not self._indexed:
                # On the same connection, so before any byte of the stage.
                self._send("SADD", self.index, self.key)
                self._indexed = True
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
            pipe = self._r.pipeline(transaction=False)
            pipe.unlink(self.key)
            if self.index is not None:
                pipe.srem(self.index, self.key)
            pipe.execute()

    def _drop_connection(self) -> None:
        # Replies may be unread: the connection cannot go back to the pool.
        if self._conn is not None:
            self._conn.disconnect()
            self._r.connection_pool.release(self._conn)
            self._conn = None
            self._pending = 0


class RedisGalaxyStore(GalaxyStore):
    """:class:`GalaxyStore` on a Redis server (binary-safe, no decoded responses).

    ``run``: the run whose keys this store holds, under ``pg:galaxy:<galaxy>:<run>:``
    (see :meth:`begin_run`); ``prefix``: any other prefix (tests), without runs.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        galaxy: int,
        run: str | None = None,
        prefix: str | None = None,
    ) -> None:
        if isinstance(galaxy, bool) or not isinstance(galaxy, int):
            raise TypeError(f"galaxy must be an int, got {type(galaxy).__name__}")
        if galaxy < 0:
            raise ValueError(f"galaxy must be >= 0, got {galaxy}")
        if run is not None and prefix is not None:
            raise ValueError("give run or prefix, not both")
        if run is not None and not RUN_ID.fullmatch(run):
            raise ValueError(
                f"run id {run!r} must be 1-128 characters of A-Z a-z 0-9 . _ -,"
                " starting with a letter or digit"
            )
        self.r: Any = client  # binary responses; redis-py types them as bytes | str
        self.galaxy = galaxy
        self.run = run
        #: the galaxy's own keys, every run's included (its ACL user's pattern)
        self.galaxy_prefix = f"pg:galaxy:{galaxy}:"
        if prefix is not None:
            self.prefix = prefix
        elif run is not None:
            self.prefix = self._run_prefix(run)
        else:
            self.prefix = self.galaxy_prefix
        self._cas = self.r.register_script(_CAS)
        self._register = self.r.register_script(_REGISTER)
        self._add_if_state = self.r.register_script(_ADD_IF_STATE)
        self._commit_stage = self.r.register_script(_COMMIT_STAGE)
        self._add_rejection = self.r.register_script(_ADD_REJECTION)
        self._begin_run = self.r.register_script(_BEGIN_RUN)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        galaxy: int,
        run: str | None = None,
        prefix: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> RedisGalaxyStore:
        return cls(
            connect(url, password=password, ca_file=ca_file),
            galaxy=galaxy,
            run=run,
            prefix=prefix,
        )

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def _run_prefix(self, run: str) -> str:
        return f"{self.galaxy_prefix}{run}:"

    def ping(self) -> bool:
        return bool(self.r.ping())

    # -- runs --------------------------------------------------------------------

    def begin_run(self) -> list[str]:
        """Register this store's run as started by its galaxy and delete the keys
        of every run the galaxy started before it; the runs that still had keys,
        oldest first.

        Idempotent: a restarted or second replica of the same run deletes nothing
        more. Raises :class:`RunSuperseded` when the galaxy already started a newer
        run (a pod of an old run must not serve, nor recreate, that run).
        """
        if self.run is None:
            raise ValueError("begin_run needs a store made with run=")
        runs = self.galaxy_prefix + "runs"
        known = {bytes(r).decode() for r in self.r.hkeys(runs)}
        freed = set()
        if self.run not in known:
            # A new run: every run the galaxy started is older. Free their keys
            # before registering, so a Redis full of the last run's updates
            # (noeviction refuses writes, never deletions) still takes it.
            freed = {r for r in known if self._delete_run(self._run_prefix(r))}
        raw = self._begin_run(keys=[runs], args=[self.run])
        order = {bytes(raw[i]).decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
        mine = order[self.run]
        newer = sorted((n, r) for r, n in order.items() if n > mine)
        if newer:
            raise RunSuperseded(
                f"galaxy {self.galaxy}: run {self.run!r} was superseded by run"
                f" {newer[-1][1]!r}; its keys may be deleted. Start a new run id"
                " instead of resuming an old one"
            )
        older = [r for n, r in sorted((n, r) for r, n in order.items() if n < mine)]
        # Every time, not once: a pod of an old run still up may write again.
        return [
            run
            for run in older
            if self._delete_run(self._run_prefix(run)) or run in freed
        ]

    def _delete_run(self, prefix: str) -> int:
        """Unlink every key a store with ``prefix`` can have written; how many
        there were."""

        def k(*parts: object) -> str:
            return prefix + ":".join(str(p) for p in parts)

        pipe = self.r.pipeline(transaction=False)
        pipe.get(k("state"))
        pipe.smembers(k("metas"))
        pipe.smembers(k("stages"))
        raw_state, metas, stages = pipe.execute()
        state = _decode_state(raw_state)
        names = [
            k(name)
            for name in (
                "state",
                "keys",
                "reputation",
                "reputation_version",
                "evidence",
                "gc_floor",
                "metas",
                "stages",
            )
        ]
        names += [k("meta", bytes(m).decode()) for m in metas]
        names += [bytes(s).decode() for s in stages]
        removed = self._unlink(names)
        last = -1 if state is None else state[0]
        for start in range(0, last + 1, 100):  # every round of the run
            removed += self._unlink(
                self._round_keys(prefix, range(start, min(start + 100, last + 1)))
            )
        return removed

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

    def commitment_count(self, round: int) -> int:
        return int(self.r.hlen(self._k("r", round, "commitments")))

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
        return RedisRevealStage(self.r, key, size, index=self._k("stages"))

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
                    self._k("stages"),
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

    def rejection_count(self, round: int) -> int:
        return int(self.r.hlen(self._k("r", round, "rejections")))

    def is_rejected(self, round: int, client: int) -> bool:
        return bool(self.r.hexists(self._k("r", round, "rejections"), str(client)))

    def put_blob(self, round: int, key: str, value: bytes) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(self._k("r", round, "blobs"), key)
            pipe.set(self._k("r", round, "blob", key), bytes(value))
            pipe.execute()

    def get_blob(self, round: int, key: str) -> bytes | None:
        value = self.r.get(self._k("r", round, "blob", key))
        return None if value is None else bytes(value)

    def put_meta(self, key: str, value: bytes) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(self._k("metas"), key)
            pipe.set(self._k("meta", key), bytes(value))
            pipe.execute()

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
                if blobs:
                    pipe.sadd(self._k("r", round, "blobs"), *blobs)
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

    # -- clean-up (by index: no SCAN) ------------------------------------------------

    def drop_round(self, round: int) -> None:
        self.drop_stages(round)
        self._unlink(self._round_keys(self.prefix, [round]))

    def drop_rounds_before(self, round: int) -> None:
        """Drop every round from the last call's ``round`` (``gc_floor``) up to
        ``round``: each round once, however many a galaxy skipped."""
        floor = int(self.r.get(self._k("gc_floor")) or 0)
        if round <= floor:
            return
        self._drop_stages_where(lambda n: n < round)
        for start in range(floor, round, 100):
            self._unlink(
                self._round_keys(self.prefix, range(start, min(start + 100, round)))
            )
        self.r.set(self._k("gc_floor"), round)

    def drop_stages(self, round: int) -> None:
        self._drop_stages_where(lambda n: n == round)

    def _drop_stages_where(self, doomed: Callable[[int], bool]) -> None:
        """Unlink the staged uploads of the rounds ``doomed(round)`` names."""
        start = len(self._k("r", ""))
        stages = []
        for raw in self.r.smembers(self._k("stages")):
            key = bytes(raw)
            number = key[start:].split(b":", 1)[0]
            if (
                key.startswith(self._k("r", "").encode())
                and number.isdigit()
                and doomed(int(number))
            ):
                stages.append(key)
        for i in range(0, len(stages), _BATCH):
            batch = stages[i : i + _BATCH]
            pipe = self.r.pipeline(transaction=False)
            pipe.unlink(*batch)
            pipe.srem(self._k("stages"), *batch)
            pipe.execute()

    def _round_keys(self, prefix: str, rounds: Iterable[int]) -> list[str]:
        """Every key of ``rounds`` under ``prefix`` but their stages: the fixed
        names, the reveal bodies of the clients that committed or revealed, and
        the blobs in the round's index."""
        rounds = list(rounds)
        if not rounds:
            return []

        def k(*parts: object) -> str:
            return prefix + ":".join(str(p) for p in parts)

        pipe = self.r.pipeline(transaction=False)
        for n in rounds:
            pipe.hkeys(k("r", n, "commitments"))
            pipe.hkeys(k("r", n, "reveals"))
            pipe.smembers(k("r", n, "blobs"))
        replies = pipe.execute()
        names = []
        for i, n in enumerate(rounds):
            committed, revealed, blobs = replies[3 * i : 3 * i + 3]
            names += [
                k("r", n, what)
                for what in ("commitments", "reveals", "rejections", "blobs")
            ]
            clients = {bytes(c).decode() for c in (*committed, *revealed)}
            names += [k("r", n, "reveal", c) for c in sorted(clients)]
            names += [k("r", n, "blob", bytes(b).decode()) for b in blobs]
        return names

    def _unlink(self, names: list[str] | list[bytes]) -> int:
        """Unlink ``names``; how many existed."""
        return sum(
            int(self.r.unlink(*names[i : i + _BATCH]))
            for i in range(0, len(names), _BATCH)
        )

"""Client runner: one or many federated clients in one process, over HTTP.

The clients use the simulation's learning and attack code (same partition, same
seeded choice of Byzantine clients, one batched training call for all of them).
Each client's Ed25519 key is derived from the provisioned clients' seed and its id
(``PG_CLIENT_SEED_FILE``), so a restarted runner registers again with the same key
and carries on; the process holds no bearer token. Each client registers (signing
its registration), commits, fetches its receipt and verifies it against the pinned
global key and its run, and only then reveals; a receipt that fails verification
stops the runner with an error. Each client forwards its galaxy's signed
acknowledgement of its reveal to the global aggregator (``PG_GLOBAL_URL``), which
holds the galaxy to it; when the global aggregator isolates a galaxy, the runner
takes its signed placement of the clients and registers the moved ones with their
new galaxies. Receipts go to ``PG_RECEIPTS_FILE`` when it is set. Requests time out
after 30 s and are retried with exponential backoff.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from protogalaxy.codec import decode_update, encode_update
from protogalaxy.config import SimulationConfig, load_config
from protogalaxy.crypto.commitment import Commitment, commit
from protogalaxy.crypto.errors import VerificationError
from protogalaxy.crypto.identity import (
    VerifyKey,
    sign_commitment,
    sign_registration,
    sign_reveal,
)
from protogalaxy.crypto.keyring import client_key, parse_keyring
from protogalaxy.crypto.receipts import Receipt, verify_receipt
from protogalaxy.crypto.statements import (
    Acknowledgement,
    ModelStatement,
    Signed,
    SignedDocument,
)
from protogalaxy.learning.attacks import train_clients
from protogalaxy.learning.datasets import Dataset, load_dataset
from protogalaxy.learning.training import round_lr
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.services.common import MAX_BATCH, RUN_HEADER, env
from protogalaxy.simulation import ClientSide

__all__ = ["ClientRunner", "ClientSettings", "ReceiptRejected", "WrongRun", "parse_ids"]

_log = logging.getLogger("protogalaxy.client")


class ReceiptRejected(RuntimeError):
    """A galaxy handed out a receipt, or every galaxy a model, that does not verify
    against the pinned global key: stop, do not reveal or train."""


def parse_ids(spec: str) -> list[int]:
    """``"0-29"``, ``"1,4,7"`` or a mix, as a sorted list of client ids."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


@dataclass(frozen=True)
class ClientSettings:
    client_ids: list[int]
    #: "http://protogalaxy-galaxy-{galaxy}:8000" (Kubernetes), or ...
    galaxy_url_template: str | None
    #: the provisioned secret every simulated client's key is derived from
    client_seed_file: str
    global_public_key: str
    run_id: str
    #: ... an explicit URL per galaxy id (``protogalaxy up``).
    galaxy_urls: tuple[str, ...] = ()
    #: the global aggregator: acknowledgements go there, the placement comes from
    #: there (None: neither, e.g. a client runner in a test)
    global_url: str | None = None
    #: the galaxies' keyring, to check acknowledgements before forwarding them
    galaxy_keys_file: str | None = None
    #: a JSON-lines file every verified receipt is appended to
    receipts_file: str | None = None
    config_path: str | None = None
    timeout_s: float = 30.0
    retries: int = 8
    #: how often a waiting client asks its galaxies for their phase (PG_POLL_S),
    #: when it cannot wait on them (long polls off or refused)
    poll_s: float = 0.05
    #: how long one request waits on a galaxy's next phase (PG_LONG_POLL_S; 0:
    #: poll every poll_s instead). A waiting runner sends each galaxy one request
    #: per phase change, and one per long_poll_s while nothing changes.
    long_poll_s: float = 20.0
    #: how long a pod of another run may answer (409 wrong_run) before giving up
    wrong_run_patience_s: float = 600.0

    def __post_init__(self) -> None:
        # the galaxies wait at most 30 s a request (wait_s <= 30); NaN is refused
        if not 0 <= self.long_poll_s <= 30:
            raise ValueError(
                f"long_poll_s (PG_LONG_POLL_S) must be in [0, 30], got "
                f"{self.long_poll_s}"
            )
        if not self.poll_s > 0:
            raise ValueError(f"poll_s (PG_POLL_S) must be > 0, got {self.poll_s}")

    @classmethod
    def from_env(cls) -> ClientSettings:
        ids = env("PG_CLIENT_IDS", "")
        if not ids:  # an Indexed Job: this pod's slice from its completion index
            index = int(env("JOB_COMPLETION_INDEX"))
            per_pod = int(env("PG_CLIENTS_PER_POD", "1"))
            ids = f"{index * per_pod}-{index * per_pod + per_pod - 1}"
        urls = env("PG_GALAXY_URLS", "")
        return cls(
            client_ids=parse_ids(ids),
            galaxy_url_template=env("PG_GALAXY_URL_TEMPLATE", "") or None,
            galaxy_urls=tuple(u for u in urls.split(",") if u),
            client_seed_file=env("PG_CLIENT_SEED_FILE"),
            global_public_key=env("PG_GLOBAL_PUBLIC_KEY"),
            run_id=env("PG_RUN_ID"),
            global_url=env("PG_GLOBAL_URL", "") or None,
            galaxy_keys_file=env("PG_GALAXY_KEYS_FILE", "") or None,
            receipts_file=env("PG_RECEIPTS_FILE", "") or None,
            config_path=env("PG_CONFIG", "") or None,
            poll_s=float(env("PG_POLL_S", "0.05")),
            long_poll_s=float(env("PG_LONG_POLL_S", "20")),
            wrong_run_patience_s=float(env("PG_WRONG_RUN_PATIENCE_S", "600")),
        )


class WrongRun(RuntimeError):
    """Pods of another run kept answering for longer than the client waits."""


#: what a client keeps between commit and reveal: commitment, nonce, body
_Made = tuple[Commitment, bytes, bytes]


def _batches(by_galaxy: dict[int, list[Any]]) -> list[tuple[int, list[Any]]]:
    """``(galaxy, items)`` jobs of at most ``MAX_BATCH`` items each."""
    return [
        (g, items[i : i + MAX_BATCH])
        for g, items in sorted(by_galaxy.items())
        for i in range(0, len(items), MAX_BATCH)
    ]


def _results(resp: httpx.Response, n: int) -> list[dict[str, Any]] | None:
    """A batch answer's per-item results, when it is one for ``n`` items."""
    if resp.status_code != 200:
        return None
    try:
        results = resp.json().get("results")
    except (ValueError, AttributeError, RecursionError):  # not a batch answer
        return None
    if not isinstance(results, list) or len(results) != n:
        return None
    if not all(isinstance(x, dict) for x in results):
        return None
    return results


class ClientRunner:
    def __init__(
        self,
        settings: ClientSettings,
        *,
        config: SimulationConfig | None = None,
        dataset: Dataset | None = None,
    ) -> None:
        cfg = config or load_config(settings.config_path)
        # The last pod of an Indexed Job may get a slice past the last client.
        settings = dataclasses.replace(
            settings,
            client_ids=[c for c in settings.client_ids if c < cfg.clients.count],
        )
        if not settings.client_ids:
            raise ValueError(f"no client ids below clients.count={cfg.clients.count}")
        self.settings = settings
        self.config = cfg
        self.data = dataset or load_dataset(cfg.dataset.name, root=cfg.dataset.root)
        # The simulation's client side, built the same way, so both train alike.
        side = ClientSide.build(cfg, self.data)
        self.generator = side.generator
        self.model = side.model
        self.spec = side.spec
        self.trainer = side.trainer
        self.attack = side.attack
        self.defense = side.defense
        # Keep only this pod's clients' rows (a pod holds a few clients of many):
        # the whole training set stays loaded in no client pod.
        own = {c: side.parts[c] for c in settings.client_ids}
        rows = torch.unique(torch.cat(list(own.values())))  # sorted
        self.parts = {c: torch.searchsorted(rows, p) for c, p in own.items()}
        self.data = Dataset(
            self.data.name,
            self.data.x_train[rows].clone(),
            self.data.y_train[rows].clone(),
            self.data.x_test[:0].clone(),
            self.data.y_test[:0].clone(),
            self.data.num_classes,
        )
        self.byzantine = set(side.byzantine) & set(settings.client_ids)
        seed = Path(settings.client_seed_file).read_bytes()
        self.keys = {c: client_key(seed, c) for c in settings.client_ids}
        self.run_id = settings.run_id
        self.global_key = VerifyKey.from_bytes(
            bytes.fromhex(settings.global_public_key)
        )
        self.galaxy_keys = (
            {}
            if settings.galaxy_keys_file is None
            else parse_keyring(Path(settings.galaxy_keys_file).read_text())
        )
        self.assignment = Assignment(cfg.clients.count, cfg.galaxies.count)
        self._assignment_checked = 0.0
        self.galaxies = sorted({self.galaxy_of(c) for c in settings.client_ids})
        waiters = min(len(self.galaxies), 64)
        self.http = httpx.Client(
            timeout=settings.timeout_s,
            limits=httpx.Limits(max_connections=16 + waiters),
            headers={RUN_HEADER: settings.run_id},
        )
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="client")
        #: one long poll per galaxy at most, kept across waits
        self._waiters = ThreadPoolExecutor(
            max_workers=max(1, waiters), thread_name_prefix="wait"
        )
        #: per galaxy, the view a pending long poll was asked with, and the poll
        self._polls: dict[int, tuple[str | None, Future[dict[str, Any]]]] = {}
        self.rounds_done: list[int] = []
        self._receipts_lock = threading.Lock()

    def url(self, galaxy: int, path: str) -> str:
        if self.settings.galaxy_urls:
            return self.settings.galaxy_urls[galaxy] + path
        if self.settings.galaxy_url_template is None:
            raise RuntimeError("set PG_GALAXY_URL_TEMPLATE or PG_GALAXY_URLS")
        return self.settings.galaxy_url_template.format(galaxy=galaxy) + path

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request with retries on connection errors and 5xx, backing off.
        Only an answer that names this client's run counts (``x-pg-run``): one
        from a pod of another run (an upgrade rolling out, whatever its status,
        409 ``wrong_run`` or a 200 saying that run is over) is retried for up to
        ``wrong_run_patience_s`` without using up the retries, then refused with
        :class:`WrongRun`."""
        delay = 0.1
        attempt = 0
        patience = time.monotonic() + self.settings.wrong_run_patience_s
        while attempt <= self.settings.retries:
            try:
                resp = self.http.request(method, url, **kwargs)
                theirs = resp.headers.get(RUN_HEADER)
                if theirs != self.run_id:
                    if time.monotonic() >= patience:
                        raise WrongRun(
                            f"{method} {url}: answered by run {theirs!r} "
                            f"(status {resp.status_code}), not run {self.run_id!r}"
                        )
                    _log.info("%s %s: answered by run %s, waiting for ours",
                              method, url, theirs)  # fmt: skip
                    time.sleep(min(delay, 2.0))
                    delay = min(delay * 2, 5.0)
                    continue
                if resp.status_code < 500:
                    return resp
                _log.info("%s %s: %d, retrying", method, url, resp.status_code)
            except httpx.TransportError as exc:
                if attempt == self.settings.retries:
                    raise
                _log.info("%s %s: %s, retrying", method, url, exc)
            attempt += 1
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        return resp

    def sampled(self, rnd: int) -> frozenset[int]:
        """Every client that takes part in round ``rnd`` (the run's seeded sample
        of each galaxy's clients, as the galaxies draw it)."""
        sampling = self.config.sampling()
        if sampling.everyone:
            return frozenset(self.settings.client_ids)
        out: set[int] = set()
        for g, members in self.assignment.members().items():
            out |= sampling.clients(members, rnd, g)
        return frozenset(out)

    def galaxy_of(self, client: int) -> int:
        """``client``'s galaxy under the global aggregator's current placement."""
        return self.assignment.galaxy_of(client)

    def register(self, clients: list[int] | None = None, *, wait_s: float = 0) -> None:
        """Register every client (or ``clients``) with its galaxy (again, after a
        restart: the same key, so the galaxy takes it). ``wait_s``: how long to
        retry a galaxy that does not admit the client yet (one that has still to
        take a new placement)."""
        for c in self.keys if clients is None else clients:
            key, g = self.keys[c], self.galaxy_of(c)
            body = {
                "client_id": c,
                "public_key": key.public_key.to_bytes().hex(),
                "signature": sign_registration(
                    key, client_id=c, galaxy_id=g, run=self.run_id
                ).hex(),
            }
            deadline = time.monotonic() + wait_s
            while True:
                resp = self.request("POST", self.url(g, "/v1/register"), json=body)
                if resp.status_code == 201:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"client {c}: registration refused: {resp.text}")
                time.sleep(0.2)

    def refresh_assignment(self, *, force: bool = False) -> bool:
        """Take the global aggregator's signed placement of the clients (at most
        once a second unless ``force``); register moved clients with their new
        galaxies. True when the placement changed."""
        if self.settings.global_url is None or (
            not force and time.monotonic() - self._assignment_checked < 1.0
        ):
            return False
        self._assignment_checked = time.monotonic()
        resp = self.request("GET", self.settings.global_url + "/v1/assignment")
        if resp.status_code != 200:
            return False
        doc = SignedDocument.from_dict(resp.json(), kind="assignment")
        try:
            doc.verify(self.global_key, run=self.run_id)
        except VerificationError as exc:
            raise ReceiptRejected(
                f"the placement of the clients does not verify against the pinned "
                f"global key ({exc})"
            ) from exc
        new = Assignment.from_dict(doc.body["assignment"])
        if new.isolated == self.assignment.isolated:
            return False
        moved = [c for c in self.keys if new.galaxy_of(c) != self.galaxy_of(c)]
        self.assignment = new
        self.galaxies = sorted({self.galaxy_of(c) for c in self.keys})
        _log.warning(
            "galaxies %s isolated: clients %s move to other galaxies",
            sorted(new.isolated),
            moved,
        )
        self.register(moved, wait_s=120)
        return True

    def states(self) -> dict[int, dict[str, Any]]:
        self.refresh_assignment()
        return {
            g: self.request("GET", self.url(g, "/v1/round")).json()
            for g in self.galaxies
        }

    def _long_poll(self, galaxy: int, view: str) -> dict[str, Any]:
        """``galaxy``'s state once it differs from ``view`` (or after
        ``long_poll_s``); a galaxy that refuses the wait (too many waiters) is
        asked plainly after ``poll_s``."""
        url = self.url(galaxy, "/v1/round")
        wait_s = self.settings.long_poll_s
        resp = self.request(
            "GET",
            url,
            params={"view": view, "wait_s": wait_s},
            timeout=wait_s + self.settings.timeout_s,
        )
        if resp.status_code == 200:
            return resp.json()  # type: ignore[no-any-return]
        _log.info("galaxy %d refused a long poll (%d): %s", galaxy,
                  resp.status_code, resp.text[:200])  # fmt: skip
        time.sleep(self.settings.poll_s)
        return self.request("GET", url).json()  # type: ignore[no-any-return]

    def wait(
        self, until: Callable[[dict[int, dict[str, Any]]], bool]
    ) -> dict[int, dict[str, Any]]:
        """The galaxies' states once ``until`` holds for them. Each galaxy is
        asked with a long poll (one at a time per galaxy), so a waiting runner
        costs a galaxy one request per phase change, not one per ``poll_s``.

        A poll's answer is taken only if it was asked with the view this runner
        holds for that galaxy now: an answer to an older view (a poll left from an
        earlier wait) may predate what a later plain request read, and is
        dropped. Polls of galaxies no longer this runner's are dropped unread."""
        states = self.states()
        while not until(states):
            views: dict[int, str] = {
                g: v
                for g in self.galaxies
                if isinstance(v := states.get(g, {}).get("view"), str)
            }
            if self.settings.long_poll_s <= 0 or len(views) < len(self.galaxies):
                # no long polls (off, or a galaxy that does not offer them)
                time.sleep(self.settings.poll_s)
                states = self.states()
                continue
            for g in self.galaxies:
                if g not in self._polls:
                    self._polls[g] = (
                        views[g],
                        self._waiters.submit(self._long_poll, g, views[g]),
                    )
            # A galaxy behind the others may have been isolated (it will never
            # move on): then look at the placement every second, not only when
            # a poll answers.
            rounds = [x.get("round") for x in states.values()]
            known = [r for r in rounds if isinstance(r, int)]
            behind = bool(known) and any(
                not isinstance(r, int) or r < max(known) for r in rounds
            )
            futures.wait(
                [f for g, (_, f) in self._polls.items() if g in views],
                timeout=1.0 if behind else None,
                return_when=futures.FIRST_COMPLETED,
            )
            for g, (asked, fut) in list(self._polls.items()):
                if not fut.done():
                    continue
                del self._polls[g]
                if g in views and asked == views[g]:
                    states[g] = fut.result()
            self.refresh_assignment()  # an isolation moves clients to other galaxies
            states = {g: states[g] for g in self.galaxies if g in states}
            for g in self.galaxies:
                if g not in states:
                    states[g] = self.request("GET", self.url(g, "/v1/round")).json()
        return states

    def run(self, max_rounds: int | None = None) -> list[int]:
        """Take part in rounds until the run is finished; return the rounds joined."""
        self.register()
        self.refresh_assignment()
        next_round = 0

        def opened(x: dict[str, Any], n: int) -> bool:
            return (
                x["round"] is not None
                and x["round"] >= n
                and x["phase"] == "commit"
                and x["model_version"] == x["round"]
            )

        def finished(s: dict[int, dict[str, Any]]) -> bool:
            return all(x["finished"] for x in s.values())

        def some_opened(s: dict[int, dict[str, Any]], n: int) -> bool:
            return finished(s) or any(opened(x, n) for x in s.values())

        def each_ready(s: dict[int, dict[str, Any]], r: int) -> bool:
            # The galaxies follow one global round: each has opened round r (or
            # moved past it); those still taking commitments are played.
            return all(
                x["finished"]
                or (x["round"] is not None and x["round"] > r)
                or (x["round"] == r and (x["phase"] != "commit" or opened(x, r)))
                for x in s.values()
            )

        while max_rounds is None or len(self.rounds_done) < max_rounds:
            states = self.wait(functools.partial(some_opened, n=next_round))
            if finished(states):
                break
            rnd = min(x["round"] for x in states.values() if opened(x, next_round))
            states = self.wait(functools.partial(each_ready, r=rnd))
            # A galaxy isolated at the end of the last round moved clients: play
            # this round with the placement as it is now. (Waiting on long polls,
            # the runner is not woken between the isolation and the next round.)
            if self.refresh_assignment(force=True):
                states = self.wait(functools.partial(each_ready, r=rnd))
            playing = [
                g for g, x in states.items() if x["round"] == rnd and opened(x, rnd)
            ]
            if playing:
                self.play_round(rnd, playing)
                self.rounds_done.append(rnd)
            next_round = rnd + 1
        # the run is over: every galaxy's view changed, so the polls answer now
        for _, fut in self._polls.values():
            fut.cancel()
        self._polls.clear()
        return self.rounds_done

    def play_round(self, rnd: int, galaxies: list[int]) -> None:
        sample = self.sampled(rnd)
        clients = [
            c
            for c in self.settings.client_ids
            if self.galaxy_of(c) in galaxies and c in sample
        ]
        if not clients:
            return  # none of this pod's clients is in the round's sample
        body = self.fetch_model(rnd, galaxies)
        if body is None:
            return  # no galaxy serves round rnd's signed model (any more)
        decoded = decode_update(body)
        self.spec.check(decoded)
        # PGT1 holds tensors in canonical (sorted) order; training flattens in the
        # order it is given, so hand it the model's order that unflatten expects.
        params = {name: decoded[name] for name in self.spec.names}
        t0 = time.perf_counter()
        updates = self.train(rnd, clients, params)
        t_train = time.perf_counter()

        def make_one(i: int) -> tuple[int, _Made, dict[str, Any]] | None:
            c = clients[i]
            if not bool(torch.isfinite(updates[i]).all()):
                # An honest client never sends what layer 1 would hold against it.
                _log.warning("client %d round %d: update not finite; skipped", c, rnd)
                return None
            tensors = self.spec.unflatten(updates[i])
            body = encode_update(tensors)
            g = self.galaxy_of(c)
            commitment, nonce = commit(tensors, client_id=c, galaxy_id=g, round=rnd)
            sig = sign_commitment(self.keys[c], commitment, run=self.run_id)
            item = {"commitment": commitment.to_dict(), "signature": sig.hex()}
            return c, (commitment, nonce, body), item

        # Each client signs its own commitment; a galaxy takes its clients'
        # commitments in batches (one request per MAX_BATCH clients, not one each).
        by_galaxy: dict[int, list[tuple[int, _Made, dict[str, Any]]]] = {}
        for one in self.pool.map(make_one, range(len(clients))):
            if one is not None:
                by_galaxy.setdefault(self.galaxy_of(one[0]), []).append(one)
        made: dict[int, _Made] = {}
        for taken in self.pool.map(
            lambda job: self.commit_batch(rnd, *job), _batches(by_galaxy)
        ):
            made.update(taken)
        t_commit = time.perf_counter()

        self.wait(
            lambda s: all(
                s[g]["finished"]
                or (s[g]["round"] or -1) > rnd
                or (
                    s[g]["round"] == rnd
                    and s[g]["phase"] not in ("commit", "closing", "committed")
                )
                for g in galaxies
            )
        )
        t_head = time.perf_counter()
        by_galaxy_made: dict[int, list[tuple[int, _Made]]] = {}
        for c, m in made.items():
            by_galaxy_made.setdefault(self.galaxy_of(c), []).append((c, m))
        # Receipts in one request per batch, then one upload per reveal (in
        # parallel), then the acknowledgements in one request per batch.
        receipts = [
            x
            for got in self.pool.map(
                lambda job: self.fetch_receipts(rnd, *job), _batches(by_galaxy_made)
            )
            for x in got
        ]
        acks: dict[int, list[tuple[int, Any]]] = {}
        for (c, g, _, _), ack in zip(
            receipts,
            self.pool.map(lambda x: self.reveal_one(rnd, *x), receipts),
            strict=True,
        ):
            if ack is not None:
                acks.setdefault(g, []).append((c, ack))
        list(self.pool.map(lambda job: self.forward(rnd, *job), _batches(acks)))
        _log.info(
            "client_round",
            extra={
                "event_record": {
                    "event": "client_round",
                    "round": rnd,
                    "clients": len(clients),
                    "train_s": round(t_train - t0, 3),
                    "commit_s": round(t_commit - t_train, 3),
                    "wait_head_s": round(t_head - t_commit, 3),
                    "reveal_s": round(time.perf_counter() - t_head, 3),
                }
            },
        )

    def fetch_model(self, rnd: int, galaxies: list[int]) -> bytes | None:
        """Round ``rnd``'s global model from the first galaxy that serves it with
        the global aggregator's valid signature: a galaxy can refuse to serve the
        model, never change it (its clients would train on it and be blamed).

        None when no galaxy serves that version (the round moved on);
        :class:`ReceiptRejected` when galaxies served it and none with a signature
        that verifies against the pinned key (a wrong pin, or every galaxy lies).
        """
        failures = []
        for g in galaxies:
            resp = self.request("GET", self.url(g, "/v1/model"))
            try:
                version = int(resp.headers["x-pg-model-version"])
                signature = bytes.fromhex(resp.headers["x-pg-model-signature"])
                if resp.status_code != 200 or version != rnd:
                    continue
                Signed(ModelStatement.of(version, resp.content), signature).verify(
                    self.global_key, run=self.run_id
                )
            except (KeyError, ValueError, VerificationError) as exc:
                _log.warning(
                    "galaxy %d served round %d's model without a valid global "
                    "signature (%s); trying another galaxy",
                    g,
                    rnd,
                    exc,
                )
                failures.append(f"galaxy {g}: {exc}")
                continue
            return resp.content
        if failures and len(failures) == len(galaxies):
            raise ReceiptRejected(
                f"round {rnd}: no galaxy serves a model that verifies against the "
                f"pinned global key ({'; '.join(failures)}); not training"
            )
        return None

    def commit_batch(
        self, rnd: int, g: int, batch: list[tuple[int, _Made, dict[str, Any]]]
    ) -> list[tuple[int, _Made]]:
        """Post up to ``MAX_BATCH`` signed commitments to galaxy ``g``; the clients
        whose commitment it took."""
        resp = self.request(
            "POST",
            self.url(g, "/v1/commitments/batch"),
            json={"items": [item for _, _, item in batch]},
        )
        results = _results(resp, len(batch))
        if results is None:
            _log.info(
                "round %d: galaxy %d refused a batch of %d commitments: %s",
                rnd,
                g,
                len(batch),
                resp.text[:500],
            )
            return []
        taken = []
        for (c, m, _), res in zip(batch, results, strict=True):
            if res.get("ok") and res.get("client_id") == c:
                taken.append((c, m))
            elif res.get("error") == "not_sampled":
                # sampled by the run's draw, refused: a stale or lying galaxy
                _log.warning(
                    "client %d round %d: galaxy %d says not sampled: %s", c, rnd, g, res
                )
            else:
                _log.info("client %d round %d: commitment refused: %s", c, rnd, res)
        return taken

    def fetch_receipts(
        self, rnd: int, g: int, batch: list[tuple[int, _Made]]
    ) -> list[tuple[int, int, _Made, Any]]:
        """The batch's receipts from galaxy ``g``, in one request: ``(client,
        galaxy, made, receipt JSON)`` for each client that has one (checked by
        :meth:`reveal_one` before it reveals)."""
        ids = ",".join(str(c) for c, _ in batch)
        got = self.request(
            "GET", self.url(g, f"/v1/rounds/{rnd}/receipts"), params={"clients": ids}
        )
        results = _results(got, len(batch))
        if results is None:
            _log.info(
                "round %d: no receipts from galaxy %d: %s", rnd, g, got.text[:500]
            )
            return []
        out = []
        for (c, made), res in zip(batch, results, strict=True):
            if res.get("ok") and res.get("client_id") == c:
                out.append((c, g, made, res.get("receipt")))
            else:
                _log.info("client %d round %d: no receipt (%s)", c, rnd, res)
        return out

    def reveal_one(
        self, rnd: int, c: int, g: int, made: _Made, receipt_json: Any
    ) -> Any:
        """Verify ``c``'s receipt, then reveal; its acknowledgement (None when the
        galaxy refused the reveal). A bad receipt stops the run."""
        commitment, nonce, body = made
        try:
            receipt = Receipt.from_dict(receipt_json)
            verify_receipt(
                receipt,
                global_key=self.global_key,
                run=self.run_id,
                commitment=commitment,
                round=rnd,
            )
        except (TypeError, KeyError, ValueError, VerificationError) as exc:
            raise ReceiptRejected(
                f"client {c} round {rnd}: galaxy {g} sent a receipt that fails "
                f"verification ({type(exc).__name__}: {exc}); not revealing"
            ) from exc
        if self.settings.receipts_file is not None:
            line = {"client": c, "round": rnd, "receipt": receipt.to_dict()}
            with self._receipts_lock, open(self.settings.receipts_file, "a") as f:
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
        sig = sign_reveal(self.keys[c], commitment, body, nonce, run=self.run_id)
        resp = self.request(
            "PUT",
            self.url(g, f"/v1/rounds/{rnd}/reveals/{c}"),
            content=body,
            headers={
                "content-type": "application/octet-stream",
                "x-pg-nonce": nonce.hex(),
                "x-pg-signature": sig.hex(),
            },
        )
        if resp.status_code != 202:
            return None
        try:
            return resp.json().get("acknowledgement")
        except (ValueError, AttributeError, RecursionError):
            # no acknowledgement to forward: the galaxy's answer is not one
            _log.warning(
                "client %d round %d: galaxy %d's answer is not JSON", c, rnd, g
            )
            return None

    def forward(self, rnd: int, g: int, acks: list[tuple[int, Any]]) -> None:
        """Hand galaxy ``g``'s acknowledgements of these clients' reveals to the
        global aggregator in one request, each checked first against the galaxy's
        key when known: the galaxy cannot then drop the updates unseen."""
        if self.settings.global_url is None:
            return
        key = self.galaxy_keys.get(g)
        items = []
        for c, ack in acks:
            try:
                signed = Signed.from_dict(Acknowledgement, ack)
                st = signed.statement
                if (st.round, st.galaxy_id, st.client_id) != (rnd, g, c):
                    raise ValueError("an acknowledgement of another reveal")
                if key is not None:
                    signed.verify(key, run=self.run_id)
            except (TypeError, ValueError, VerificationError) as exc:
                _log.warning(
                    "client %d round %d: galaxy %d's acknowledgement is not valid (%s)",
                    c,
                    rnd,
                    g,
                    exc,
                )
                continue
            items.append(signed.to_dict())
        if not items:
            return
        resp = self.request(
            "POST",
            f"{self.settings.global_url}/v1/rounds/{rnd}/acks/batch",
            json={"items": items},
        )
        results = _results(resp, len(items))
        if results is None or not all(res.get("ok") for res in results):
            _log.warning(
                "round %d: the global aggregator refused acknowledgements of galaxy "
                "%d: %s",
                rnd,
                g,
                resp.text[:500],
            )

    def train(
        self, rnd: int, clients: list[int], params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return train_clients(
            self.trainer,
            params,
            clients,
            parts=self.parts,
            x=self.data.x_train,
            y=self.data.y_train,
            attack=self.attack,
            byzantine=self.byzantine,
            galaxy_of=self.config.galaxy_of,
            round=rnd,
            seed=self.config.seed,
            generator=self.generator,
            lr=round_lr(self.config.training, rnd),
            # the run's public defense; the runner does not track layer 2's
            # direction reference, so an adaptive attack here models no
            # direction test
            defense=self.defense,
        )

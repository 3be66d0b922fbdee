"""The galaxy aggregator service: the protocol's galaxy on HTTP, its state on Redis.

The process is stateless: everything lives in Redis under the galaxy's prefix, so a
killed pod picks up where it was. A background driver moves the round on: it opens
a round when the global aggregator has one, closes the commit phase at quorum or
deadline and sends the root, takes the signed head, closes the reveal phase at
quorum or deadline and sends the aggregate bound to the root.

Identities are provisioned, never learned from the network: the galaxy signs with
its own key (``PG_SIGNING_KEY_FILE``), pins the global aggregator's public key
(``PG_GLOBAL_PUBLIC_KEY``) and admits a client only with the public key provisioned
for its id (``PG_CLIENT_KEYS_FILE``, a keyring), proven by a signed registration.

Every accepted reveal is answered with the galaxy's signed acknowledgement; every
round it closes ends with a signed transcript it sends the global aggregator with
its aggregate and evidence; auditors (``PG_AUDITOR_TOKEN``) fetch the revealed
updates by digest. When the global aggregator isolates a galaxy, this one takes the
signed placement of the clients (and the reputations of those it adopts) before it
opens the next round.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import redis
import torch
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, StrictInt, ValidationError

from protogalaxy.codec import decode_update, encode_update
from protogalaxy.config import SimulationConfig, load_config
from protogalaxy.crypto.commitment import NONCE_SIZE, Commitment
from protogalaxy.crypto.heads import SignedRoundHead
from protogalaxy.crypto.identity import SIGNATURE_SIZE, SigningKey, VerifyKey
from protogalaxy.crypto.keyring import parse_keyring
from protogalaxy.crypto.merkle import InclusionProof
from protogalaxy.crypto.statements import ModelStatement, Signed, SignedDocument
from protogalaxy.defense.pipeline import GalaxyDefense
from protogalaxy.learning.models import build_model
from protogalaxy.protocol.compromised import CompromisedGalaxy
from protogalaxy.protocol.galaxy import (
    ClientRoster,
    GalaxyAggregator,
    GalaxyRoundResult,
    Rejected,
    WrongPhase,
)
from protogalaxy.protocol.stores import Phase
from protogalaxy.services import server
from protogalaxy.services.common import (
    AUDIT_BATCH_BYTES,
    MAX_BATCH,
    RUN_HEADER,
    LongPolls,
    NotReady,
    Pump,
    Signal,
    content_length,
    env,
    install_error_handlers,
    read_batch,
    read_body,
    require_token,
    run_batch,
)
from protogalaxy.services.redis_store import RedisGalaxyStore, RunSuperseded
from protogalaxy.spec import UpdateSpec

__all__ = ["GalaxySettings", "create_app"]

_log = logging.getLogger("protogalaxy.galaxy")


@dataclass(frozen=True)
class GalaxySettings:
    galaxy_id: int
    redis_url: str
    global_url: str
    #: bearer token for the calls to the global aggregator (transport only: what
    #: the galaxy says is signed with its key)
    service_token: str
    run_id: str
    signing_key_file: str
    global_public_key: str
    #: keyring of the clients' provisioned public keys
    client_keys_file: str
    #: bearer token auditors present to fetch revealed updates
    auditor_token: str = ""
    #: or only its SHA-256 (hex): the galaxy checks it without holding it
    auditor_token_sha256: str = ""
    #: Redis password when the URL carries none (``PG_REDIS_PASSWORD``)
    redis_password: str = ""
    #: CA of the Redis server's certificate for a rediss:// URL (``PG_REDIS_CA_FILE``)
    redis_ca_file: str = ""
    config_path: str | None = None
    max_update_bytes: int = 64 << 20
    quorum: float = 1.0
    commit_deadline_s: float = 60.0
    reveal_deadline_s: float = 60.0
    poll_s: float = 0.25
    #: clients waiting at once on ``GET /v1/round?view=..&wait_s=..`` (429 beyond);
    #: from the environment at most half of ``PG_MAX_CONNECTIONS``
    max_long_polls: int = 512
    keep_rounds: int = 3
    idle_rounds: int = 2
    #: a round left ``aggregating`` this long is aggregated again by whichever
    #: replica sees it (its closer was killed); a live closer that is slower
    #: only costs a second, identical computation that writes nothing
    aggregate_lease_s: float = 60.0

    @classmethod
    def from_env(cls) -> "GalaxySettings":
        return cls(
            galaxy_id=int(env("PG_GALAXY_ID")),
            redis_url=env("PG_REDIS_URL"),
            global_url=env("PG_GLOBAL_URL"),
            service_token=env("PG_SERVICE_TOKEN"),
            run_id=env("PG_RUN_ID"),
            signing_key_file=env("PG_SIGNING_KEY_FILE"),
            global_public_key=env("PG_GLOBAL_PUBLIC_KEY"),
            client_keys_file=env("PG_CLIENT_KEYS_FILE"),
            auditor_token=env("PG_AUDITOR_TOKEN", ""),
            auditor_token_sha256=env("PG_AUDITOR_TOKEN_SHA256", ""),
            redis_password=env("PG_REDIS_PASSWORD", ""),
            redis_ca_file=env("PG_REDIS_CA_FILE", ""),
            config_path=env("PG_CONFIG", "") or None,
            max_update_bytes=int(env("PG_MAX_UPDATE_BYTES", str(64 << 20))),
            quorum=float(env("PG_QUORUM", "1.0")),
            commit_deadline_s=float(env("PG_COMMIT_DEADLINE_S", "60")),
            reveal_deadline_s=float(env("PG_REVEAL_DEADLINE_S", "60")),
            poll_s=float(env("PG_POLL_S", "0.25")),
            # Waiters hold connections: at most half of the server's (the rest
            # serve commits, reveals and probes).
            max_long_polls=min(
                int(env("PG_MAX_LONG_POLLS", "512")),
                int(env("PG_MAX_CONNECTIONS", "1024")) // 2,
            ),
            keep_rounds=int(env("PG_KEEP_ROUNDS", "3")),
            idle_rounds=int(env("PG_IDLE_ROUNDS", "2")),
            aggregate_lease_s=float(env("PG_AGGREGATE_LEASE_S", "60")),
        )


class Registration(BaseModel):
    """A client's enrolment: its id (a JSON integer), the public key provisioned
    for it, and its signature over its registration in this run (hex)."""

    client_id: StrictInt
    public_key: str
    signature: str


class CommitmentIn(BaseModel):
    commitment: dict[str, Any]
    signature: str


#: a signed commitment is about 0.4 KiB of JSON: a batch's limit is this per item
COMMITMENT_ITEM_BYTES = 2048


class _Runtime:
    """What the lifespan opens: store, protocol object, HTTP client, model."""

    def __init__(self, settings: GalaxySettings, config: SimulationConfig) -> None:
        self.settings = settings
        model = build_model(config.model, seed=config.seed)
        self.spec = UpdateSpec.from_params(dict(model.named_parameters()))
        #: the exact size of a reveal (PGT1 of the model's float32 tensors)
        self.reveal_size = len(
            encode_update(self.spec.unflatten(torch.zeros(self.spec.numel)))
        )
        if self.reveal_size > settings.max_update_bytes:
            raise ValueError(
                f"PG_MAX_UPDATE_BYTES={settings.max_update_bytes} is below the size "
                f"of one update of model {config.model} ({self.reveal_size} bytes): "
                "every reveal would be refused"
            )
        self.key = SigningKey.from_bytes(Path(settings.signing_key_file).read_bytes())
        self.global_key = VerifyKey.from_bytes(
            bytes.fromhex(settings.global_public_key)
        )
        self.roster = ClientRoster(
            settings.galaxy_id,
            config.clients.count,
            config.galaxy_of,
            parse_keyring(
                Path(settings.client_keys_file).read_text(encoding="ascii"),
                what=settings.client_keys_file,
            ),
        )
        # One run's keys: pg:galaxy:<id>:<run>: (inside the galaxy's ACL prefix).
        self.store = RedisGalaxyStore.from_url(
            settings.redis_url,
            galaxy=settings.galaxy_id,
            run=settings.run_id,
            password=settings.redis_password or None,
            ca_file=settings.redis_ca_file or None,
        )

        async def same_run(response: httpx.Response) -> None:
            # An answer of a global aggregator of another run (an upgrade rolling
            # out) is no answer: the caller retries as after any HTTP error.
            theirs = response.headers.get(RUN_HEADER)
            if theirs != settings.run_id:
                raise httpx.HTTPError(
                    f"{response.request.url.path}: answered by run {theirs!r}, "
                    f"not {settings.run_id!r}"
                )

        self.http = httpx.AsyncClient(
            base_url=settings.global_url,
            timeout=30.0,
            event_hooks={"response": [same_run]},
            headers={
                "authorization": f"Bearer {settings.service_token}",
                RUN_HEADER: settings.run_id,
            },
        )
        self.galaxy: GalaxyAggregator | None = None
        self.model_version = -1
        self.model_body: bytes | None = None
        self.model_digest: str | None = None
        self.model_signature = b""  # the global aggregator's, over body and version
        self.reference: torch.Tensor | None = None
        self.finished = False
        #: the global aggregator's latest status, kept fresh by a long poll
        self.global_status: dict[str, Any] | None = None
        self.wake = Signal()  # a commitment or reveal arrived, or the global moved
        #: what ``GET /v1/round`` answers, as of the driver's last step, and a
        #: signal fired when its view changes (long polls wait on it)
        self.round_status: dict[str, Any] | None = None
        self.round_changed = Signal()
        #: /v1/round requests waiting on it
        self.round_waiters = LongPolls(self.round_changed, settings.max_long_polls)
        self.uploading: set[tuple[int, int]] = set()  # (round, client) reveals staging
        #: the galaxies isolated, as last applied (None: not yet asked, so a
        #: restarted process or a second replica takes the placement first)
        self.isolated: list[int] | None = None


def create_app(
    settings: GalaxySettings, *, config: SimulationConfig | None = None
) -> FastAPI:
    """The galaxy service for ``settings`` (``config``: model and defense)."""
    cfg = config or load_config(settings.config_path)
    cfg.check_services()
    gid = settings.galaxy_id
    registry = CollectorRegistry()
    m_accepted = Counter(
        "protogalaxy_galaxy_updates_accepted_total",
        "Reveals accepted",
        registry=registry,
    )
    m_rounds = Counter(
        "protogalaxy_galaxy_rounds_completed_total",
        "Rounds aggregated",
        registry=registry,
    )
    m_flags = Counter(
        "protogalaxy_galaxy_flags_total",
        "Clients flagged, by layer",
        ["layer"],
        registry=registry,
    )
    m_phase = Gauge(
        "protogalaxy_galaxy_phase_duration_seconds",
        "Duration of the last phase",
        ["phase"],
        registry=registry,
    )
    m_status = Gauge(
        "protogalaxy_galaxy_clients", "Clients by status", ["status"], registry=registry
    )
    m_rep = Gauge(
        "protogalaxy_galaxy_reputation_ratio",
        "Reputation quantiles of the galaxy's clients",
        ["quantile"],
        registry=registry,
    )

    rt: _Runtime | None = None

    def runtime() -> _Runtime:
        if rt is None or rt.galaxy is None:
            raise NotReady("galaxy is starting")
        return rt

    Rt = Annotated[_Runtime, Depends(runtime)]  # noqa: N806 - a type alias

    async def refresh_model(
        r: _Runtime, version: int, digest: str | None = None
    ) -> None:
        """Fetch the global model unless the cached one is this version with
        these bytes (a global aggregator that lost its history may serve other
        bytes under a version number already seen)."""
        if r.model_version == version and digest in (None, r.model_digest):
            return
        resp = await r.http.get("/v1/model")
        resp.raise_for_status()
        got = int(resp.headers["x-pg-model-version"])
        signature = bytes.fromhex(resp.headers["x-pg-model-signature"])
        # The galaxy relays the model to its clients: it takes only one the global
        # aggregator signed (and the clients check again).
        Signed(ModelStatement.of(got, resp.content), signature).verify(
            r.global_key, run=settings.run_id
        )
        r.model_body = resp.content
        r.model_version = got
        r.model_digest = hashlib.sha256(resp.content).hexdigest()
        r.model_signature = signature
        ref = await r.http.get("/v1/reference")
        r.reference = (
            decode_update(ref.content)["direction"] if ref.status_code == 200 else None
        )

    def deadline_passed(r: _Runtime, rnd: int, key: str, seconds: float) -> bool:
        blob = r.store.get_blob(rnd, key)
        if blob is None:
            r.store.put_blob(rnd, key, str(time.time()).encode())
            return False
        return time.time() - float(blob.decode()) >= seconds

    def update_gauges(r: _Runtime) -> None:
        assert r.galaxy is not None
        tracker = r.galaxy.defense.tracker
        counts = {"active": 0, "quarantined": 0, "banned": 0}
        reps = []
        for c in r.store.clients():
            counts[tracker.status(c)] += 1
            reps.append(tracker.reputation(c))
        for status, n in counts.items():
            m_status.labels(status=status).set(n)
        if reps:
            q = torch.tensor(reps).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
            for name, v in zip(("0.1", "0.5", "0.9"), q, strict=True):
                m_rep.labels(quantile=name).set(v)

    async def step(r: _Runtime) -> None:
        galaxy = r.galaxy
        assert galaxy is not None
        status = r.global_status
        if status is None:
            status = r.global_status = (await r.http.get("/v1/status")).json()
        r.finished = bool(status["finished"])
        rnd = int(status["round"])
        state = galaxy.state
        s = r.settings
        if r.finished:
            # A galaxy (re)started after the run ended still takes the final
            # model: it is what makes it ready, and a rollout waits for that.
            if r.model_body is None:
                await refresh_model(r, rnd, status.get("model_digest"))
            return
        if gid in status.get("isolated", []):
            return  # isolated for misbehaving: its clients are with other galaxies
        # Every step, not only when opening a round: a restarted process, or a
        # replica that did not open the round, must not serve an old placement.
        await refresh_assignment(r, status)
        if state is not None and state[0] < rnd and state[1] != Phase.DONE:
            # The global aggregator closed that round without us (its deadline):
            # the round is over here too, and its updates are not aggregated.
            _log.warning(
                "round %d ended globally while this galaxy was at %s", state[0], state
            )
            r.store.compare_and_set_state(state, (state[0], Phase.DONE))
            return
        if state is None or (state[1] == Phase.DONE and state[0] < rnd):
            await refresh_model(r, rnd, status.get("model_digest"))
            await refresh_assignment(r, status)
            galaxy.open_round(rnd)
            deadline_passed(r, rnd, "opened_at", s.commit_deadline_s)
            # Every round older than the window, skipped ones included.
            r.store.drop_rounds_before(rnd - s.keep_rounds)
            return
        if state is None or state[0] != rnd:
            return
        # A restarted galaxy, mid-round (or the global model changed under us).
        await refresh_model(r, rnd, status.get("model_digest"))
        phase = state[1]
        leaf_blob = r.store.get_blob(rnd, "leaf")
        if (
            status["phase"] == "leaves"
            and phase in (Phase.REVEAL, Phase.AGGREGATING, Phase.DONE)
            and leaf_blob is not None
        ):
            # The global aggregator restarted from its checkpoint and lost this
            # round's roots: send ours again (and, after the head, the transcript
            # and aggregate: see unsent).
            signed = galaxy.signed_root(rnd)
            assert signed is not None
            await r.http.post(f"/v1/rounds/{rnd}/leaves", json=signed.to_dict())
            return
        if phase in (Phase.COMMIT, Phase.CLOSING):
            late = deadline_passed(r, rnd, "opened_at", s.commit_deadline_s)
            if phase == Phase.CLOSING or galaxy.commit_quorum_reached(rnd) or late:
                t0 = time.perf_counter()
                leaf = galaxy.close_commit(rnd, force=True)
                m_phase.labels(phase="commit").set(time.perf_counter() - t0)
                if leaf is not None:
                    resp = await r.http.post(
                        f"/v1/rounds/{rnd}/leaves", json=leaf.to_dict()
                    )
                    resp.raise_for_status()
                else:
                    await abstain(r, rnd)
        elif phase == Phase.COMMITTED:
            signed = galaxy.signed_root(rnd)
            assert signed is not None
            await r.http.post(f"/v1/rounds/{rnd}/leaves", json=signed.to_dict())
            resp = await r.http.get(f"/v1/rounds/{rnd}/head", params={"galaxy": gid})
            if resp.status_code == 200:
                body = resp.json()
                galaxy.accept_head(
                    rnd,
                    SignedRoundHead.from_dict(body["head"]),
                    InclusionProof.from_dict(body["proof"]),
                )
                deadline_passed(r, rnd, "reveal_opened_at", s.reveal_deadline_s)
        elif phase == Phase.REVEAL:
            late = deadline_passed(r, rnd, "reveal_opened_at", s.reveal_deadline_s)
            if galaxy.reveal_quorum_reached(rnd) or late:
                t0 = time.perf_counter()
                # Off the event loop: the galaxy keeps answering meanwhile.
                result = await asyncio.to_thread(
                    galaxy.close_reveal,
                    rnd,
                    reference_direction=r.reference,
                    force=True,
                )
                await aggregated(r, rnd, result, time.perf_counter() - t0)
        elif phase == Phase.AGGREGATING:
            since = galaxy.aggregating_since(rnd)
            if since is None or time.time() - since >= s.aggregate_lease_s:
                # Its closer was killed (or stalled): every reveal answered 202
                # is stored, so the round is aggregated again, to the same bytes.
                t0 = time.perf_counter()
                result = await asyncio.to_thread(
                    galaxy.resume_aggregation, rnd, reference_direction=r.reference
                )
                await aggregated(r, rnd, result, time.perf_counter() - t0)
        elif phase == Phase.DONE and r.store.get_blob(rnd, "leaf") is None:
            if r.store.get_blob(rnd, "abstained") is None:
                await abstain(r, rnd)
        elif phase == Phase.DONE and status["phase"] == "aggregates":
            if unsent(r, rnd, "transcript", status):
                await send_transcript(r, rnd)
            if unsent(r, rnd, "aggregate", status):
                await send_aggregate(r, rnd)

    def unsent(r: _Runtime, rnd: int, what: str, status: dict[str, Any]) -> bool:
        """Whether the round's transcript or aggregate is still to be sent: never
        sent, or sent to a global aggregator process that has restarted since and
        does not list it as received (it lost it with its memory)."""
        sent = r.store.get_blob(rnd, f"{what}_sent")
        if sent is None:
            return True
        if sent == b"none":  # there was nothing to send
            return False
        received = status.get("received", {}).get(f"{what}s")
        boot = str(status.get("view", "")).split(":")[0]
        return received is not None and gid not in received and sent.decode() != boot

    async def aggregated(
        r: _Runtime, rnd: int, result: GalaxyRoundResult, seconds: float
    ) -> None:
        m_phase.labels(phase="aggregate").set(seconds)
        m_rounds.inc()
        for layer, n in result.report.layer_flags.items():
            m_flags.labels(layer=layer).inc(n)
        update_gauges(r)  # the protocol logs each quarantine or ban event
        # The transcript first: once the global aggregator has every aggregate,
        # an honest galaxy's transcript is already there.
        await send_transcript(r, rnd)
        await send_aggregate(r, rnd)

    async def abstain(r: _Runtime, rnd: int) -> None:
        assert r.galaxy is not None
        resp = await r.http.post(
            f"/v1/rounds/{rnd}/abstentions/{gid}",
            json=r.galaxy.abstention(rnd).to_dict(),
        )
        if resp.status_code == 409:  # the global moved on: nothing to wait for
            _log.info("abstention for round %d came too late: %s", rnd, resp.text)
        else:
            resp.raise_for_status()
        r.store.put_blob(rnd, "abstained", b"yes")

    def boot_of(r: _Runtime) -> bytes:
        """The global aggregator process the status was read from."""
        status = r.global_status or {}
        return str(status.get("view", "")).split(":")[0].encode() or b"unknown"

    async def send_aggregate(r: _Runtime, rnd: int) -> None:
        assert r.galaxy is not None
        made = r.galaxy.signed_aggregate(rnd)
        if made is None:
            r.store.put_blob(rnd, "aggregate_sent", b"none")
            return
        signed, vector = made
        resp = await r.http.post(
            f"/v1/rounds/{rnd}/aggregates/{gid}",
            content=encode_update({"aggregate": vector}),
            headers={
                "x-pg-statement": signed.statement.to_bytes().hex(),
                "x-pg-signature": signed.signature.hex(),
            },
        )
        if resp.status_code in (200, 202):
            r.store.put_blob(rnd, "aggregate_sent", boot_of(r))
        else:
            _log.error("global refused the aggregate of round %d: %s", rnd, resp.text)

    async def send_transcript(r: _Runtime, rnd: int) -> None:
        """The round's signed transcript, the reputation states it starts and ends
        with, and its signed evidence records, to the global aggregator."""
        assert r.galaxy is not None
        published = r.galaxy.transcript(rnd)
        if published is None:  # (only a galaxy that withholds it)
            r.store.put_blob(rnd, "transcript_sent", b"none")
            return
        doc, before, after = published
        evidence = [e for e in r.store.evidence() if e.get("round") == rnd]
        resp = await r.http.post(
            f"/v1/rounds/{rnd}/transcripts/{gid}",
            json={
                "transcript": doc.to_dict(),
                "reputation_before": before,
                "reputation_after": after,
                "evidence": evidence,
            },
        )
        if resp.status_code in (200, 202):
            r.store.put_blob(rnd, "transcript_sent", boot_of(r))
        else:
            _log.error("global refused the transcript of round %d: %s", rnd, resp.text)

    async def refresh_assignment(r: _Runtime, status: dict[str, Any]) -> None:
        """After the global aggregator isolated a galaxy: take its signed placement
        of the clients, and the reputations of the clients this galaxy adopts."""
        isolated = sorted(status.get("isolated", []))
        if isolated == r.isolated:
            return
        resp = await r.http.get("/v1/assignment")
        resp.raise_for_status()
        assert r.galaxy is not None
        doc = SignedDocument.from_dict(resp.json(), kind="assignment")
        r.galaxy.apply_assignment(doc)  # verifies the global aggregator's signature
        r.isolated = sorted(doc.body["assignment"]["isolated"])

    async def drive(r: _Runtime) -> None:
        """Step when a client or the global aggregator changed something, and every
        ``poll_s`` for the deadlines."""
        while True:
            ticket = r.wake.ticket()
            try:
                await step(r)
            except (httpx.HTTPError, WrongPhase) as exc:
                _log.info("driver: %s", exc)
            except redis.exceptions.OutOfMemoryError as exc:
                # noeviction: Redis refuses writes rather than drop updates
                _log.error(
                    "redis_out_of_memory",
                    extra={
                        "event_record": {
                            "event": "redis_out_of_memory",
                            "galaxy": gid,
                            "detail": str(exc),
                        }
                    },
                )
            except Exception:
                _log.exception("driver step failed")
            await publish_round(r)
            await Signal.wait(ticket, r.settings.poll_s)

    async def publish_round(r: _Runtime) -> None:
        """Keep ``r.round_status`` fresh (one store read a driver step, whatever
        the number of clients waiting) and wake the long polls when it changed."""
        if r.galaxy is None:
            return
        try:
            status = await asyncio.to_thread(read_round, r)
        except redis.exceptions.RedisError as exc:
            _log.info("round status: %s", exc)
            return
        except Exception:  # the driver loop must outlive any bug here
            _log.exception("round status failed")
            return
        old = r.round_status
        r.round_status = status
        if old is None or old["view"] != status["view"]:
            r.round_changed.fire()

    def read_round(r: _Runtime) -> dict[str, Any]:
        assert r.galaxy is not None
        state = r.galaxy.state
        out: dict[str, Any] = {
            "galaxy": gid,
            "round": None if state is None else state[0],
            "phase": None if state is None else state[1],
            "model_version": r.model_version,
            "finished": r.finished,
        }
        out["view"] = (
            f"{out['round']}:{out['phase']}:{out['model_version']}:{int(r.finished)}"
        )
        return out

    async def watch_global(r: _Runtime) -> None:
        """Long-poll the global aggregator's status; wake the driver on a change."""
        while True:
            last = r.global_status
            view = None if last is None else last["view"]
            # A finished run changes only when a new one starts: ask without
            # waiting, so no long poll holds the global aggregator's shutdown.
            wait_s = 0 if last is not None and last["finished"] else 10
            try:
                resp = await r.http.get(
                    "/v1/status", params={"view": view or "", "wait_s": wait_s}
                )
                resp.raise_for_status()
                status = resp.json()
            except httpx.HTTPError as exc:
                _log.info("status of the global aggregator: %s", exc)
                r.global_status = None  # the driver asks directly meanwhile
                await asyncio.sleep(r.settings.poll_s)
                continue
            if status["view"] != view:
                r.global_status = status
                r.wake.fire()
            if status["finished"]:
                await asyncio.sleep(5 * r.settings.poll_s)

    def begin_run(r: _Runtime) -> None:
        """Register the run in Redis and delete this galaxy's older runs' keys."""
        try:
            deleted = r.store.begin_run()
        except RunSuperseded as exc:
            _log.error(
                "run_superseded",
                extra={
                    "event_record": {
                        "event": "run_superseded",
                        "galaxy": gid,
                        "run": settings.run_id,
                        "detail": str(exc),
                    }
                },
            )
            raise
        if deleted:
            _log.warning(
                "old_runs_deleted",
                extra={
                    "event_record": {
                        "event": "old_runs_deleted",
                        "galaxy": gid,
                        "run": settings.run_id,
                        "deleted": deleted,
                    }
                },
            )

    def build_galaxy(r: _Runtime) -> GalaxyAggregator:
        """The aggregator over the store: reads (resumes) the run's state in Redis."""
        begin_run(r)
        attack = cfg.galaxy_attack_config()
        extra: dict[str, Any] = {}
        galaxy_class: type[GalaxyAggregator] = GalaxyAggregator
        if attack is not None and cfg.galaxy_attack.galaxy == gid:
            # a scenario: this galaxy is the compromised one (see the config)
            galaxy_class, extra = CompromisedGalaxy, {"attack": attack}
        return galaxy_class(
            gid,
            **extra,
            store=r.store,
            spec=r.spec,
            defense=GalaxyDefense(gid, cfg.defense.build()),
            key=r.key,
            global_key=r.global_key,
            roster=r.roster,
            run=settings.run_id,
            max_update_bytes=settings.max_update_bytes,
            quorum=settings.quorum,
            idle_rounds=settings.idle_rounds,
            sampling=cfg.sampling(),
        )

    async def start(r: _Runtime) -> None:
        """Open the run once Redis answers, then drive it. The server is already
        listening meanwhile: /livez says alive, /readyz and the API say 503
        not_ready, and SIGTERM stops it at once (a pod waiting for Redis or the
        global aggregator neither fails its startup probe nor hangs)."""
        delay = 0.2
        while r.galaxy is None:
            try:
                r.galaxy = await asyncio.to_thread(build_galaxy, r)
            except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as e:
                fatal(e)  # credentials or the ACL: waiting does not heal them
            except redis.RedisError as exc:
                # Down, loading, busy (a neighbour's script), full, read-only or
                # failing over: Redis heals, the galaxy waits for it.
                log = _log.warning if delay == 0.2 else _log.info
                log("waiting for Redis: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception as exc:  # a newer run took over, a corrupt state
                fatal(exc)
        await asyncio.gather(drive(r), watch_global(r))

    def fatal(exc: BaseException) -> NoReturn:
        """A galaxy that cannot open its run (a newer run took over, Redis refuses
        its credentials or permissions, a corrupt state) exits non-zero with the
        reason logged: the pod restarts visibly (CrashLoopBackOff) instead of
        staying not-ready forever. Nothing a peer sends reaches this: the API
        answers 503 until the run is open."""
        _log.critical(
            "galaxy_start_failed",
            exc_info=exc,
            extra={
                "event_record": {
                    "event": "galaxy_start_failed",
                    "galaxy": gid,
                    "run": settings.run_id,
                    "detail": f"{type(exc).__name__}: {exc}",
                }
            },
        )
        logging.shutdown()
        os._exit(3)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal rt
        r = _Runtime(settings, cfg)
        rt = r
        task = asyncio.create_task(start(r))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await r.http.aclose()

    app = FastAPI(title=f"ProtoGalaxy galaxy {gid}", lifespan=lifespan)
    install_error_handlers(
        app,
        service="galaxy",
        registry=registry,
        context={"galaxy": gid},
        # Redis at maxmemory (noeviction) refuses writes: 503, logged, retried
        unavailable=(
            redis.ConnectionError,
            redis.TimeoutError,
            redis.exceptions.OutOfMemoryError,
        ),
        # a reveal's body is read with PG_MAX_UPDATE_BYTES as its limit, a
        # batch's with its own
        streamed=lambda method, path: (
            (method == "PUT" and "/reveals/" in path)
            or (method == "POST" and path == "/v1/commitments/batch")
        ),
        run=settings.run_id,
    )

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(r: Rt) -> dict[str, Any]:
        if not r.store.ping() or r.model_body is None:
            raise NotReady("Redis unreachable or no model yet")
        return {
            "status": "ready",
            "galaxy": gid,
            "round": r.galaxy.state if r.galaxy else None,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(
            generate_latest(registry) + generate_latest(server.REGISTRY),
            media_type=CONTENT_TYPE_LATEST,
        )

    @app.post("/v1/register", status_code=201)
    def register(body: Registration, r: Rt) -> dict[str, Any]:
        """Admit a client whose key is the one provisioned for its id, proven by its
        signature over the registration (no bearer token: the key is the
        credential). Idempotent: a restarted client registers again."""
        assert r.galaxy is not None
        try:
            public_key = bytes.fromhex(body.public_key)
            signature = bytes.fromhex(body.signature)
        except ValueError:
            raise Rejected(
                "malformed", "public_key and signature must be hex"
            ) from None
        r.galaxy.register(body.client_id, public_key, signature)
        return {"client_id": body.client_id, "galaxy": gid}

    @app.get("/v1/round")
    async def current_round(
        request: Request,
        r: Rt,
        view: Annotated[str | None, Query(max_length=100)] = None,
        wait_s: Annotated[float, Query(ge=0, le=30)] = 0.0,
    ) -> dict[str, Any]:
        """The galaxy's round, phase and model version. With ``view`` (from an
        earlier answer) and ``wait_s``, answer once the view differs from it or
        ``wait_s`` has passed: clients wait for the next phase without polling,
        so a galaxy's request rate is set by its phases, not by its clients'
        patience. At most ``PG_MAX_LONG_POLLS`` wait at once (429
        ``too_many_waiters``)."""

        async def current() -> dict[str, Any]:
            # the driver's status when it has one, so a plain answer and a long
            # poll's never disagree on which phase came first
            if r.round_status is not None:
                return r.round_status
            return await asyncio.to_thread(read_round, r)

        if view is None or wait_s <= 0:
            return await current()
        return await r.round_waiters.answer(request, view, wait_s, current)

    @app.get("/v1/model")
    def model(r: Rt) -> Response:
        if r.model_body is None:
            raise NotReady("no model yet")
        return Response(
            r.model_body,
            media_type="application/octet-stream",
            headers={
                "x-pg-model-version": str(r.model_version),
                "x-pg-model-signature": r.model_signature.hex(),
            },
        )

    @app.post("/v1/commitments", status_code=202)
    def commit(body: CommitmentIn, r: Rt) -> dict[str, Any]:
        assert r.galaxy is not None
        c = Commitment.from_dict(body.commitment)
        r.galaxy.submit_commitment(c, bytes.fromhex(body.signature))
        r.wake.fire()  # the commit quorum may be reached
        return {"accepted": True, "round": c.round, "client_id": c.client_id}

    @app.post("/v1/commitments/batch")
    async def commit_batch(request: Request, r: Rt) -> dict[str, Any]:
        """Many clients' signed commitments in one request (a runner playing many
        clients): each is checked and stored exactly as ``POST /v1/commitments``
        would, and answered in order with its own result or refusal. The batch is
        only transport: every commitment still carries its own client's signature."""
        assert r.galaxy is not None
        galaxy = r.galaxy
        items = await read_batch(request, COMMITMENT_ITEM_BYTES, "commitments")

        def one(item: Any) -> dict[str, Any]:
            # Refused as POST /v1/commitments would refuse it: 422 for a body
            # that is not {commitment, signature}, 400 for fields that do not
            # parse.
            try:
                body = CommitmentIn.model_validate(item)
            except ValidationError as exc:
                raise Rejected("malformed", str(exc.errors())[:500]) from None
            try:
                c = Commitment.from_dict(body.commitment)
                signature = bytes.fromhex(body.signature)
            except (TypeError, KeyError) as exc:
                raise ValueError(f"commitment: {exc!r}") from None
            galaxy.submit_commitment(c, signature)
            return {"round": c.round, "client_id": c.client_id}

        try:
            results = await run_in_threadpool(run_batch, request, items, one)
        finally:
            r.wake.fire()  # the commit quorum may be reached
        return {"results": results}

    @app.get("/v1/rounds/{rnd}/receipts/{client}")
    def receipt(rnd: int, client: int, r: Rt) -> dict[str, Any]:
        assert r.galaxy is not None
        return r.galaxy.receipt(rnd, client).to_dict()

    @app.get("/v1/rounds/{rnd}/receipts")
    def receipts(
        rnd: int, r: Rt, request: Request, clients: Annotated[str, Query()]
    ) -> dict[str, Any]:
        """Receipts for many clients (``?clients=3,17,42``, at most ``MAX_BATCH``),
        each answered in order as ``GET .../receipts/{client}`` would."""
        assert r.galaxy is not None
        galaxy = r.galaxy
        try:
            ids = [int(x) for x in clients.split(",")]
        except ValueError:
            raise Rejected(
                "malformed", "clients is a comma-separated list of client ids"
            ) from None
        if not 1 <= len(ids) <= MAX_BATCH or len(set(ids)) != len(ids):
            raise Rejected(
                "malformed", f"ask for 1 to {MAX_BATCH} distinct receipts at once"
            )

        def one(client: int) -> dict[str, Any]:
            receipt = galaxy.receipt(rnd, client)
            return {"client_id": client, "receipt": receipt.to_dict()}

        return {"results": run_batch(request, ids, one)}

    @app.put("/v1/rounds/{rnd}/reveals/{client}", status_code=202)
    async def reveal(
        rnd: int,
        client: int,
        request: Request,
        r: Rt,
        x_pg_nonce: Annotated[str, Header()],
        x_pg_signature: Annotated[str, Header()],
    ) -> dict[str, Any]:
        assert r.galaxy is not None
        try:
            nonce, signature = bytes.fromhex(x_pg_nonce), bytes.fromhex(x_pg_signature)
        except ValueError:
            raise Rejected(
                "malformed", "X-PG-Nonce and X-PG-Signature must be hex"
            ) from None
        if len(nonce) != NONCE_SIZE or len(signature) != SIGNATURE_SIZE:
            raise Rejected(
                "malformed",
                f"X-PG-Nonce must be {NONCE_SIZE} bytes and X-PG-Signature "
                f"{SIGNATURE_SIZE}",
            )
        # While the body arrives, a thread hashes it (the one pass the reveal needs)
        # and streams it into a stage in the store; both release the GIL, so they
        # overlap the transfer. Accepting the reveal is then one O(1) commit.
        # Nothing is staged without a commitment to check the body against
        # (submit_reveal says why), nor for a second upload of the same reveal
        # while the first is still arriving (it is checked after it arrived).
        limit = r.settings.max_update_bytes
        size = content_length(request, limit)  # a 413 before anything is staged
        # A reveal of this model has one exact size: anything else is refused
        # before a byte of it is read or staged.
        if size is None:
            raise Rejected(
                "length_required",
                f"a reveal needs a Content-Length ({r.reveal_size} bytes)",
            )
        if size != r.reveal_size:
            raise Rejected(
                "wrong_size",
                f"a reveal of this model is {r.reveal_size} bytes, not {size}",
            )
        upload = (rnd, client)
        hasher = None
        if upload not in r.uploading:
            hasher = r.galaxy.reveal_hasher(rnd, client, nonce)
        stage, pump = None, None
        if hasher is not None:
            stage = r.store.stage_reveal(rnd, client, size)
            pump = Pump(hasher.update, stage.write)
            r.uploading.add(upload)
        try:
            body = await read_body(request, limit, None if pump is None else pump.feed)
            if pump is not None:
                await pump.close()
            # In a worker thread: the commit waits for Redis to catch up with the
            # stage, and other uploads keep arriving meanwhile.
            ack = await run_in_threadpool(
                r.galaxy.submit_reveal,
                rnd,
                client,
                body,
                nonce,
                signature,
                digest=None if hasher is None else hasher.digest(),
                staged=stage,
            )
        finally:
            if pump is not None and stage is not None:
                r.uploading.discard(upload)
                pump.then(stage.discard)  # a no-op once committed
            r.wake.fire()  # accepted or rejected, it counts toward the quorum
        m_accepted.inc()
        return {
            "accepted": True,
            "round": rnd,
            "client_id": client,
            # the galaxy's signed word that it took this reveal: the client keeps it
            # and forwards it to the global aggregator
            "acknowledgement": ack.to_dict(),
        }

    def auditor_access(request: Request, r: _Runtime) -> GalaxyAggregator:
        """The galaxy, for a holder of the auditor token (401 otherwise)."""
        require_token(
            request,
            r.settings.auditor_token,
            what="auditor",
            sha256=r.settings.auditor_token_sha256,
        )
        assert r.galaxy is not None
        return r.galaxy

    def kept_transcript(
        galaxy: GalaxyAggregator, rnd: int
    ) -> tuple[SignedDocument, dict[str, Any], dict[str, Any]]:
        published = galaxy.transcript(rnd)
        if published is None:
            raise Rejected("not_found", f"no transcript of round {rnd} is kept")
        return published

    @app.get("/v1/audit/rounds/{rnd}/transcript")
    def audit_transcript(rnd: int, request: Request, r: Rt) -> dict[str, Any]:
        """The round's signed transcript and the reputation states it starts and
        ends with, as sent to the global aggregator; for auditors."""
        galaxy = auditor_access(request, r)
        published = kept_transcript(galaxy, rnd)
        doc, before, after = published
        return {
            "transcript": doc.to_dict(),
            "reputation_before": before,
            "reputation_after": after,
        }

    @app.get("/v1/audit/rounds/{rnd}/updates/{digest}")
    def audit_update(rnd: int, digest: str, request: Request, r: Rt) -> Response:
        """A revealed update of ``rnd``, by its reveal digest (hex), for auditors:
        the bytes the client revealed, which the auditor checks against the
        client's leaf and signature. Kept for ``PG_KEEP_ROUNDS`` rounds."""
        galaxy = auditor_access(request, r)
        published = kept_transcript(galaxy, rnd)
        for e in published[0].body["clients"]:
            if e.get("reveal_digest") == digest.lower():
                body = galaxy.audit_update(rnd, int(e["client"]))
                if body is not None:
                    return Response(body, media_type="application/octet-stream")
        raise Rejected("not_found", f"no update with digest {digest} is kept")

    @app.get("/v1/audit/rounds/{rnd}/updates")
    def audit_updates(
        rnd: int, request: Request, r: Rt, digests: Annotated[str, Query()]
    ) -> Response:
        """Many revealed updates of ``rnd`` at once (``?digests=<hex>,<hex>``, at
        most ``MAX_BATCH``), for the global aggregator's audit: the transcript is
        read once for all of them. The answer covers a prefix of the digests that
        fits in ``AUDIT_BATCH_BYTES`` (at least one; ``x-pg-count`` says how many):
        for each, an 8-byte little-endian length and the bytes, length 0 for an
        update that is not kept. Nothing in it is trusted: the auditor checks each
        update against the transcript."""
        galaxy = auditor_access(request, r)
        wanted = [d.lower() for d in digests.split(",")]
        if not 1 <= len(wanted) <= MAX_BATCH or len(set(wanted)) != len(wanted):
            raise Rejected(
                "malformed", f"ask for 1 to {MAX_BATCH} distinct updates at once"
            )
        published = kept_transcript(galaxy, rnd)
        client_of = {
            e.get("reveal_digest"): int(e["client"])
            for e in published[0].body["clients"]
        }
        parts: list[bytes] = []
        size = 0
        count = 0
        for digest in wanted:
            c = client_of.get(digest)
            body = None if c is None else galaxy.audit_update(rnd, c)
            body = body or b""
            if count and size + 8 + len(body) > AUDIT_BATCH_BYTES:
                break
            parts += [len(body).to_bytes(8, "little"), body]
            size += 8 + len(body)
            count += 1
        return Response(
            b"".join(parts),
            media_type="application/octet-stream",
            headers={"x-pg-count": str(count)},
        )

    @app.get("/v1/clients/{client}")
    def client_state(client: int, r: Rt) -> dict[str, Any]:
        assert r.galaxy is not None
        if r.store.client_key(client) is None:
            raise Rejected("unknown_client", f"client {client} is not registered here")
        tracker = r.galaxy.defense.tracker
        record = tracker.record(client)
        return {
            "client_id": client,
            "galaxy": gid,
            "reputation": record.reputation,
            "status": record.status,
            # rounds scored, rounds in which its update was aggregated, last round
            "rounds": record.rounds,
            "clean_rounds": record.clean_rounds,
            "last_round": record.last_round,
        }

    @app.get("/v1/clients/{client}/evidence")
    def client_evidence(client: int, r: Rt) -> list[dict[str, Any]]:
        return r.store.evidence(client)

    @app.get("/v1/quarantine")
    def quarantine(r: Rt) -> dict[str, Any]:
        assert r.galaxy is not None
        tracker = r.galaxy.defense.tracker
        out = {"quarantined": [], "banned": []}  # type: dict[str, list[int]]
        for c in r.store.clients():
            status = tracker.status(c)
            if status in out:
                out[status].append(c)
        return out

    return app

"""The global aggregator service: the protocol's global aggregator on HTTP, its
state on a volume (the StatefulSet's PVC).

The data directory holds the Ed25519 signing key (created on first start, mode
0600, unless ``PG_SIGNING_KEY_FILE`` names a provisioned one) and the checkpoints
(model, server optimizer, galaxy reputations, audit log). The galaxies' public keys
come from ``PG_GALAXY_KEYS_FILE`` (a keyring): a root, abstention or aggregate for
galaxy ``g`` is accepted only when galaxy ``g``'s key signed it in run ``PG_RUN_ID``.
On start the service resumes from the newest checkpoint that verifies. A background
driver signs the round head once every galaxy sent its root (or at the deadline) and
finishes the round once every galaxy with a root sent its aggregate (or at the
deadline), then evaluates the model and checkpoints every ``checkpoint_every`` rounds.
"""

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
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

from protogalaxy.artefacts import (
    ArtefactWriter,
    is_published,
    published,
)
from protogalaxy.codec import decode_update, encode_update
from protogalaxy.config import SimulationConfig, load_config
from protogalaxy.crypto.identity import SigningKey, VerifyKey
from protogalaxy.crypto.keyring import parse_keyring
from protogalaxy.crypto.statements import (
    Abstention,
    Acknowledgement,
    AggregateStatement,
    ModelStatement,
    Signed,
    SignedDocument,
    sign_document,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf
from protogalaxy.defense.pipeline import GlobalDefense
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.learning.models import build_model
from protogalaxy.learning.server import server_step
from protogalaxy.learning.training import evaluate
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.checkpoint import CheckpointDir, HeadDir
from protogalaxy.protocol.galaxy import Rejected, WrongPhase
from protogalaxy.protocol.global_aggregator import (
    AuditSettings,
    GlobalAggregator,
    GlobalRoundResult,
)
from protogalaxy.protocol.transcript import digest_hex
from protogalaxy.services import server
from protogalaxy.services.common import (
    AUDIT_BATCH_BYTES,
    JSON_LIMIT,
    MAX_BATCH,
    RUN_HEADER,
    LongPolls,
    NotReady,
    Signal,
    env,
    install_error_handlers,
    read_batch,
    read_body,
    read_json,
    require_token,
    run_batch,
)
from protogalaxy.spec import UpdateSpec

__all__ = ["ACK_BYTES", "GlobalSettings", "create_app", "fetch_updates"]

#: an acknowledgement is ~0.5 KiB of JSON; anything much larger is refused unread
ACK_BYTES = 4096

_log = logging.getLogger("protogalaxy.global")


@dataclass(frozen=True)
class GlobalSettings:
    data_dir: str
    galaxies: int
    service_token: str
    run_id: str
    #: keyring of the galaxies' public keys (``<galaxy>,<hex>`` lines)
    galaxy_keys_file: str
    #: keyring of the clients' public keys (their signatures in transcripts)
    client_keys_file: str = ""
    #: where the galaxies serve revealed updates to auditors: an explicit URL per
    #: galaxy, or a template with ``{galaxy}``
    galaxy_urls: tuple[str, ...] = ()
    galaxy_url_template: str | None = None
    #: the bearer token this service presents to galaxies, and auditors to it
    auditor_token: str = ""
    #: where the run's artefacts go (``protogalaxy audit``); default
    #: ``<data_dir>/artefacts``
    audit_dir: str | None = None
    config_path: str | None = None
    rounds: int | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    leaf_deadline_s: float = 120.0
    aggregate_deadline_s: float = 120.0
    #: once every aggregate is in, how long to wait for the transcripts still
    #: missing (a galaxy sends its transcript right after its aggregate; one that
    #: never comes is misbehaviour)
    transcript_deadline_s: float = 30.0
    #: the largest transcript upload (with its reputation states and evidence)
    max_transcript_bytes: int = 64 << 20
    max_update_bytes: int = 64 << 20
    evaluate: bool = True
    poll_s: float = 0.25
    signing_key_file: str | None = None
    #: start although checkpoints or signed rounds were lost (logged as an
    #: error); without it the service refuses to start over a lost history
    accept_checkpoint_loss: bool = False
    #: long polls of /v1/status waiting at once (each holds a connection)
    max_long_polls: int = 32
    #: how long a drawn galaxy may give no answer to the audit's fetches before
    #: its round is left out as unaudited (a restart takes a few seconds)
    audit_fetch_s: float = 30.0
    #: other runs' directories beside ``data_dir`` kept (the newest; older ones,
    #: with their checkpoints and audit artefacts, are deleted at start); None
    #: keeps every one
    keep_previous_runs: int | None = None

    @classmethod
    def from_env(cls) -> "GlobalSettings":
        rounds = env("PG_ROUNDS", "")
        return cls(
            data_dir=env("PG_DATA_DIR"),
            keep_previous_runs=(
                int(env("PG_KEEP_PREVIOUS_RUNS"))
                if env("PG_KEEP_PREVIOUS_RUNS", "")
                else None
            ),
            galaxies=int(env("PG_GALAXIES")),
            service_token=env("PG_SERVICE_TOKEN"),
            run_id=env("PG_RUN_ID"),
            galaxy_keys_file=env("PG_GALAXY_KEYS_FILE"),
            client_keys_file=env("PG_CLIENT_KEYS_FILE", ""),
            galaxy_urls=tuple(u for u in env("PG_GALAXY_URLS", "").split(",") if u),
            galaxy_url_template=env("PG_GALAXY_URL_TEMPLATE", "") or None,
            auditor_token=env("PG_AUDITOR_TOKEN", ""),
            audit_dir=env("PG_AUDIT_DIR", "") or None,
            config_path=env("PG_CONFIG", "") or None,
            rounds=int(rounds) if rounds else None,
            checkpoint_every=int(env("PG_CHECKPOINT_EVERY", "1")),
            keep_checkpoints=int(env("PG_KEEP_CHECKPOINTS", "3")),
            leaf_deadline_s=float(env("PG_LEAF_DEADLINE_S", "120")),
            aggregate_deadline_s=float(env("PG_AGGREGATE_DEADLINE_S", "120")),
            transcript_deadline_s=float(env("PG_TRANSCRIPT_DEADLINE_S", "30")),
            max_transcript_bytes=int(env("PG_MAX_TRANSCRIPT_BYTES", str(64 << 20))),
            max_update_bytes=int(env("PG_MAX_UPDATE_BYTES", str(64 << 20))),
            evaluate=env("PG_EVALUATE", "1") == "1",
            poll_s=float(env("PG_POLL_S", "0.25")),
            signing_key_file=env("PG_SIGNING_KEY_FILE", "") or None,
            accept_checkpoint_loss=env("PG_ACCEPT_CHECKPOINT_LOSS", "0") == "1",
            max_long_polls=int(env("PG_MAX_LONG_POLLS", "32")),
            audit_fetch_s=float(env("PG_AUDIT_FETCH_S", "30")),
        )


def load_or_create_signing_key(path: Path) -> SigningKey:
    """The Ed25519 key in ``path``, created (mode 0600, fsynced) if there is none."""
    if path.exists():
        return SigningKey.from_bytes(path.read_bytes())
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_bytes())
        f.flush()
        os.fsync(f.fileno())
    return key


# -- evaluation, in a child process ---------------------------------------------
# Test accuracy is reporting, not protocol. It runs in a child process at nice 19:
# a thread would share the GIL, and a starved low-priority thread holding the GIL
# stalls the whole service (priority inversion).

_EVAL: dict[str, Any] = {}


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies, however the
    parent dies (a SIGKILLed global aggregator must not leave its evaluator)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def _eval_init(
    parent: int, model: str, seed: int, dataset: str, root: str | None
) -> None:
    _die_with_parent(parent)
    with contextlib.suppress(OSError):
        os.nice(19)
    torch.set_num_threads(1)
    _EVAL["model"] = build_model(model, seed=seed)
    _EVAL["data"] = load_dataset(dataset, root=root)


def _eval_params(flat: torch.Tensor) -> tuple[float, float]:
    model, data = _EVAL["model"], _EVAL["data"]
    spec = UpdateSpec.from_params(dict(model.named_parameters()))
    params = spec.unflatten(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return evaluate(model, data.x_test, data.y_test)


def _evaluator(config: SimulationConfig) -> ProcessPoolExecutor:
    """A one-process pool that loads the model and test set once, at start."""
    return ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_eval_init,
        initargs=(
            os.getpid(),
            config.model,
            config.seed,
            config.dataset.name,
            config.dataset.root,
        ),
    )


def _stop_evaluator(pool: ProcessPoolExecutor) -> None:
    """Stop the evaluator now: an evaluation in progress is only reporting."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.terminate()


#: a directory holding one of these was a run's (nothing else is ever deleted)
_RUN_MARKERS = ("checkpoints", "heads", "artefacts")


def prune_previous_runs(current: Path, keep: int) -> list[Path]:
    """Delete the oldest run directories beside ``current`` (one per run on the
    global aggregator's volume) so that ``keep`` others remain; return them.
    Only directories with a run's layout are candidates: a volume's
    ``lost+found`` or a user's file stays."""
    runs = [
        d
        for d in current.parent.iterdir()
        if d.is_dir()
        and not d.is_symlink()
        and d.resolve() != current.resolve()
        and any((d / m).is_dir() for m in _RUN_MARKERS)
    ]
    runs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    doomed = runs[max(keep, 0) :]
    for d in doomed:
        _log.warning("deleting the directory of an old run: %s", d)
        shutil.rmtree(d, ignore_errors=True)
    return doomed


class _Runtime:
    def __init__(self, settings: GlobalSettings, config: SimulationConfig) -> None:
        self.settings = settings
        self.config = config
        self.rounds = settings.rounds or config.training.rounds
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        if settings.keep_previous_runs is not None:
            prune_previous_runs(data, settings.keep_previous_runs)
        if settings.signing_key_file:  # provisioned (Kubernetes: a Secret)
            self.key = SigningKey.from_bytes(
                Path(settings.signing_key_file).read_bytes()
            )
        else:
            self.key = load_or_create_signing_key(data / "signing.key")
        self.checkpoints = CheckpointDir(
            data / "checkpoints", keep=settings.keep_checkpoints
        )
        self.model = build_model(config.model, seed=config.seed)
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.spec = UpdateSpec.from_params(params)
        keyring = parse_keyring(
            Path(settings.galaxy_keys_file).read_text(encoding="ascii"),
            what=settings.galaxy_keys_file,
        )
        missing = sorted(set(range(settings.galaxies)) - set(keyring))
        if missing:
            raise RuntimeError(
                f"{settings.galaxy_keys_file} has no key for galaxies {missing}"
            )
        clients: dict[int, VerifyKey] = {}
        if settings.client_keys_file:
            clients = parse_keyring(
                Path(settings.client_keys_file).read_text(encoding="ascii"),
                what=settings.client_keys_file,
            )
        audit = config.audit
        if audit.enabled and not clients:
            raise RuntimeError("auditing galaxies needs PG_CLIENT_KEYS_FILE")
        self.agg = GlobalAggregator(
            key=self.key,
            galaxy_keys={g: keyring[g] for g in range(settings.galaxies)},
            assignment=Assignment(config.clients.count, config.galaxies.count),
            run=settings.run_id,
            params=self.spec.flatten(params),
            defense=GlobalDefense(config.defense.build()),
            server=server_step(config.training),
            sampling=config.sampling(),
            audit=AuditSettings(
                enabled=audit.enabled,
                fraction=audit.fraction,
                client_keys=clients,
                spec=self.spec,
                max_update_bytes=settings.max_update_bytes,
            ),
            config_digest=digest_hex(config.model_dump()),
        )
        # What the run publishes for anyone to check (protogalaxy audit).
        self.artefacts = ArtefactWriter(
            Path(settings.audit_dir or data / "artefacts"),
            keep_updates=audit.keep_updates,
        )
        public = {"global.pub": self.key.public_key.to_bytes().hex().encode()}
        public["galaxies.pub"] = Path(settings.galaxy_keys_file).read_bytes()
        if settings.client_keys_file:
            public["clients.pub"] = Path(settings.client_keys_file).read_bytes()
        self.artefacts.write_identity(
            settings.run_id, config.model_dump(), public, self.spec
        )
        #: round -> galaxy -> the signed evidence records it sent with its transcript
        self.evidence: dict[int, dict[int, list[dict[str, Any]]]] = {}
        #: one record per round applied (or skipped), checkpointed with the model
        self.history: list[dict[str, Any]] = []
        self.heads = HeadDir(data / "heads")
        self._resume(settings)
        self.phase_since = time.monotonic()
        #: when the last expected aggregate of the round arrived
        self.aggregates_in: float | None = None
        #: the served model: PGT1 body, version, signature (see model_body)
        self.model_cache: tuple[bytes, int, bytes] | None = None
        self.model_digest: str | None = None
        # The driver (a worker thread) and the request handlers (the thread pool)
        # share the aggregator: every use of it holds this lock.
        self.lock = threading.Lock()
        # Evaluation is reporting, not protocol: a child process evaluates round
        # after round while the next round goes on (see _evaluator).
        self.evaluator = _evaluator(config) if settings.evaluate else None
        self.evaluating = 0  # rounds applied and not yet evaluated
        # This process's start: a restart changes the view galaxies wait on.
        self.boot = secrets.token_hex(4)
        self.poke = Signal()  # a leaf, abstention or aggregate arrived
        self.changed = Signal()  # the view (round, phase, finished) changed
        #: /v1/status requests waiting on it
        self.waiters = LongPolls(self.changed, settings.max_long_polls)

    def _resume(self, settings: GlobalSettings) -> None:
        """Resume from the newest checkpoint, and the head already signed for
        the round it resumes at. A checkpoint that does not verify, or a round
        signed after the newest checkpoint that does, is lost history: the
        service refuses to start unless ``PG_ACCEPT_CHECKPOINT_LOSS=1``, and then
        goes on past every round it ever signed a head for, never signing a
        second head for one."""
        present = self.checkpoints.rounds()
        latest = self.checkpoints.latest()
        lost: list[str] = []
        if present and (latest is None or latest.round != present[-1]):
            kept = "none" if latest is None else f"round {latest.round}"
            bad = [r for r in present if latest is None or r > latest.round]
            lost.append(
                f"checkpoints of rounds {bad} do not verify (newest usable: {kept})"
            )
        if latest is not None:
            self.agg.restore(latest)
            self.history = list(latest.meta.get("history", []))
        signed = self.heads.rounds()
        beyond = [r for r in signed if r > self.agg.round]
        if beyond:
            lost.append(f"rounds {beyond} were signed after round {self.agg.round}")
        current = None
        if self.agg.round in signed:
            try:
                current = self.heads.load(self.agg.round)
                if current is not None:
                    self.agg.resume_signed_round(current)
            except (ValueError, KeyError, TypeError) as exc:
                lost.append(f"the signed head of round {self.agg.round}: {exc}")
                current = None
                beyond = beyond or [self.agg.round]
        if lost:
            record = {"event": "checkpoint_loss", "lost": lost, "signed": signed}
            if not settings.accept_checkpoint_loss:
                _log.error("refusing to start", extra={"event_record": record})
                raise RuntimeError(
                    "refusing to start over lost history: "
                    + "; ".join(lost)
                    + ". Restore the data volume, or set PG_ACCEPT_CHECKPOINT_LOSS=1"
                    " to go on from what is left (past every round already signed)"
                )
            _log.error("checkpoint_loss", extra={"event_record": record})
            if beyond:
                resume_at = max(beyond) + 1
                for rnd in range(self.agg.round, resume_at):
                    self.history.append(
                        {"round": rnd, "galaxies": [], "excluded": {}, "lost": True}
                    )
                self.agg.skip_to(resume_at)
        if latest is not None or current is not None:
            _log.warning(
                "resumed",
                extra={
                    "event_record": {
                        "event": "resumed",
                        "round": self.agg.round,
                        "phase": self.agg.phase,
                    }
                },
            )

    def view(self) -> str:
        """What galaxies wait on: it changes when they may have something to do."""
        return f"{self.boot}:{self.agg.round}:{self.agg.phase}:{self.finished}"

    def galaxy_url(self, galaxy: int) -> str:
        if self.settings.galaxy_urls:
            return self.settings.galaxy_urls[galaxy]
        if self.settings.galaxy_url_template:
            return self.settings.galaxy_url_template.format(galaxy=galaxy)
        raise RuntimeError("set PG_GALAXY_URLS or PG_GALAXY_URL_TEMPLATE to audit")

    @property
    def finished(self) -> bool:
        return self.agg.round >= self.rounds


class _NoAnswer(Exception):
    """A status that is not the galaxy's answer (yet): ask again."""


def _audit_answer_cap(max_update_bytes: int) -> int:
    """The most a galaxy's answer to one batch of audit updates may hold: its
    byte budget, or one whole update when that is larger, with the frames."""
    return max(AUDIT_BATCH_BYTES, max_update_bytes) + 8 * MAX_BATCH


async def _read_answer(resp: httpx.Response, cap: int) -> bytes | None:
    """The answer's bytes as sent; None (read no further) for an encoded answer
    (it could inflate past any cap) or one longer than ``cap``."""
    if resp.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    declared = resp.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        return None
    buf = bytearray()
    async for chunk in resp.aiter_raw():
        buf += chunk
        if len(buf) > cap:
            return None
    return bytes(buf)


def _frames(
    body: bytes, headers: httpx.Headers, asked: int, max_update_bytes: int
) -> list[bytes] | None:
    """A galaxy's batch of audit updates as one body per answered digest (empty:
    not kept), or None when the answer does not parse (count, lengths, bytes)."""
    try:
        count = int(headers.get("x-pg-count", ""))
    except ValueError:
        return None
    if not 1 <= count <= asked:
        return None
    out = []
    pos = 0
    for _ in range(count):
        if pos + 8 > len(body):
            return None
        n = int.from_bytes(body[pos : pos + 8], "little")
        pos += 8
        if n > max_update_bytes or pos + n > len(body):
            return None
        out.append(body[pos : pos + n])
        pos += n
    return out if pos == len(body) else None


async def fetch_updates(
    r: _Runtime, rnd: int, targets: dict[int, list[int]]
) -> tuple[dict[int, dict[int, bytes]], set[int]]:
    """The revealed updates each drawn galaxy's replay needs, by digest, from
    the galaxy itself: what it answers without is missing (its replay fails);
    a galaxy that gives no answer at all within ``PG_AUDIT_FETCH_S`` is
    unreachable (a fault, not proof: its round is left out unaudited)."""
    unreachable: set[int] = set()
    with r.lock:
        sent = r.agg.round_state.transcripts
        # A drawn galaxy that sent no transcript needs nothing: it is caught
        # as missing.
        targets = {g: c for g, c in targets.items() if g in sent}
        transcripts = {g: sent[g][0].body for g in targets}
    headers = {
        "authorization": f"Bearer {r.settings.auditor_token}",
        RUN_HEADER: r.settings.run_id,  # a galaxy pod of another run says 409
    }
    out: dict[int, dict[int, bytes]] = {g: {} for g in targets}

    give_up = time.monotonic() + r.settings.audit_fetch_s

    cap = _audit_answer_cap(r.settings.max_update_bytes)

    async def get(client: httpx.AsyncClient, g: int, ask: list[str]) -> Any:
        """One batch request, asked again while the galaxy gives no answer
        (no connection, a 5xx, a 409 from a pod of another run, a 429):
        ``(status, body)``, the body None for an answer that cannot be one
        (encoded, or over the cap); None when the fetch's deadline passed."""
        url = f"{r.galaxy_url(g)}/v1/audit/rounds/{rnd}/updates"
        pause = 0.2
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                return None
            try:
                async with client.stream(
                    "GET",
                    url,
                    headers=headers,
                    params={"digests": ",".join(ask)},
                    timeout=min(60.0, left),
                ) as resp:
                    status = resp.status_code
                    if status in (409, 429) or status >= 500:
                        raise _NoAnswer(f"{status}")
                    return status, resp.headers, await _read_answer(resp, cap)
            except (httpx.HTTPError, _NoAnswer) as exc:
                _log.info("galaxy %d audit updates: %s", g, exc)
                if time.monotonic() + pause > give_up:
                    return None
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)

    async def of_galaxy(
        client: httpx.AsyncClient, g: int, digests: dict[int, str]
    ) -> None:
        """Every update galaxy ``g`` keeps of those wanted, in batches; what it
        answers without (or answers wrongly) is missing, for its replay. A
        galaxy that has not answered for all of them by the fetch's deadline
        (slowly, a page at a time) is unreachable."""
        pending = list(digests.items())
        while pending:
            ask = pending[:MAX_BATCH]
            got = await get(client, g, [d for _, d in ask])
            if got is None:
                unreachable.add(g)
                return
            status, resp_headers, body = got
            bodies = (
                _frames(body, resp_headers, len(ask), r.settings.max_update_bytes)
                if status == 200 and body is not None
                else None
            )
            if not bodies:  # refused, or an answer that does not parse
                _log.info("galaxy %d: no audit updates (%d)", g, status)
                return
            for (c, _), data in zip(ask, bodies, strict=False):
                if data:
                    out[g][c] = data
            pending = pending[len(bodies) :]

    async def in_time(client: httpx.AsyncClient, g: int, d: dict[int, str]) -> None:
        try:
            async with asyncio.timeout(max(0.0, give_up - time.monotonic())):
                await of_galaxy(client, g, d)
        except TimeoutError:
            _log.info("galaxy %d: audit updates not served in time", g)
            unreachable.add(g)

    async with httpx.AsyncClient(
        timeout=60.0,
        limits=httpx.Limits(max_connections=8),
        # the bytes as sent: nothing to inflate past the cap
        headers={"accept-encoding": "identity"},
    ) as client:
        jobs = []
        for g, wanted in targets.items():
            try:
                entries = {e["client"]: e for e in transcripts[g]["clients"]}
                digests = {c: str(entries[c]["reveal_digest"]) for c in wanted}
            except (KeyError, TypeError):  # malformed: its replay says so
                continue
            jobs.append(in_time(client, g, digests))
        await asyncio.gather(*jobs)
    for g in unreachable:
        out.pop(g, None)
    return out, unreachable


def create_app(
    settings: GlobalSettings, *, config: SimulationConfig | None = None
) -> FastAPI:
    cfg = config or load_config(settings.config_path)
    cfg.check_services()
    registry = CollectorRegistry()
    m_rounds = Counter(
        "protogalaxy_global_rounds_completed_total", "Rounds applied", registry=registry
    )
    m_last_round = Gauge(
        "protogalaxy_global_last_round",
        "The last round applied (survives restarts, unlike the counter)",
        registry=registry,
    )
    m_round_s = Gauge(
        "protogalaxy_global_round_duration_seconds",
        "Last round's duration",
        registry=registry,
    )
    m_accuracy = Gauge(
        "protogalaxy_global_accuracy_ratio",
        "Test accuracy of the model",
        registry=registry,
    )
    m_excluded = Counter(
        "protogalaxy_global_galaxies_excluded_total",
        "Galaxy aggregates excluded by layer 5",
        registry=registry,
    )
    rt: _Runtime | None = None

    def runtime() -> _Runtime:
        if rt is None:
            raise NotReady("global aggregator is starting")
        return rt

    Rt = Annotated[_Runtime, Depends(runtime)]  # noqa: N806 - a type alias

    def model_digest(r: _Runtime) -> str:
        """SHA-256 of the served model's bytes: a galaxy that caches the model
        fetches it again when this changes, even under the same version."""
        model_body(r)
        assert r.model_digest is not None
        return r.model_digest

    def model_body(r: _Runtime) -> tuple[bytes, int, bytes]:
        """The served model (``PGT1``), its version and the global aggregator's
        signature over both; encoded and signed once per version."""
        version = r.agg.round
        if r.model_cache is None or r.model_cache[1] != version:
            body = encode_update(r.spec.unflatten(r.agg.params))
            signed = sign_statement(
                r.key, ModelStatement.of(version, body), run=r.settings.run_id
            )
            r.model_cache = (body, version, signed.signature)
            r.model_digest = hashlib.sha256(body).hexdigest()
        return r.model_cache

    def step(r: _Runtime) -> tuple[int, dict[int, list[int]]] | None:
        """Move the round on; when its aggregates are in, the round and the
        galaxies to replay (with the clients whose updates each replay needs)."""
        with r.lock:
            before = r.view()
            ready = _step(r)
            changed = r.view() != before
        if changed:
            r.changed.fire()
        return ready

    def _step(r: _Runtime) -> tuple[int, dict[int, list[int]]] | None:
        if r.finished:
            return None
        agg = r.agg
        rnd = agg.round
        waited = time.monotonic() - r.phase_since
        if agg.phase == "leaves":
            n = len(agg.leaves)
            answered = n + len(agg.abstained)
            waiting_for = len(agg.assignment.active())  # isolated galaxies: none
            if answered >= waiting_for or waited > r.settings.leaf_deadline_s:
                if n:
                    # Stored before anyone can see it: a restart serves it again.
                    agg.close_leaves(rnd, persist=r.heads.save)
                else:
                    agg.skip_round(rnd)
                    r.history.append(
                        {"round": rnd, "galaxies": [], "excluded": {}, "skipped": True}
                    )
                r.phase_since = time.monotonic()
                r.aggregates_in = None
        elif agg.phase == "aggregates":
            expected = set(agg.leaves)
            have = set(agg.aggregates)
            state = agg.round_state
            if have >= expected and r.aggregates_in is None:
                r.aggregates_in = time.monotonic()
            transcripts = not agg.audit.enabled or set(state.transcripts) >= expected
            late = r.aggregates_in is not None and (
                time.monotonic() - r.aggregates_in > r.settings.transcript_deadline_s
            )
            if (
                have >= expected and (transcripts or late)
            ) or waited > r.settings.aggregate_deadline_s:
                return rnd, agg.audit_targets(rnd)
        return None

    def finish(
        r: _Runtime,
        rnd: int,
        updates: dict[int, dict[int, bytes]],
        unreachable: set[int] | None = None,
    ) -> None:
        """Audit, apply, log, publish and checkpoint round ``rnd``."""
        with r.lock:
            before = r.view()
            agg = r.agg
            if (agg.round, agg.phase) != (rnd, "aggregates"):
                return
            waited = time.monotonic() - r.phase_since
            have = set(agg.aggregates)
            t0 = time.perf_counter()
            reference = agg.reference_direction
            result = agg.finish_round(
                rnd, updates=updates, unreachable=unreachable or set()
            )
            publish(r, rnd, result, reference, updates)
            m_rounds.inc()
            m_last_round.set(rnd)
            m_excluded.inc(len(result.report.excluded))
            record: dict[str, Any] = {
                "round": rnd,
                "galaxies": sorted(have),
                "excluded": result.report.excluded,
                "misbehaved": {m.galaxy: m.kind for m in result.misbehaved},
                # galaxies whose aggregate norm was scaled down (layer 5)
                "clipped": result.report.clipped,
                "applied": result.applied,
            }
            r.history.append(record)
            if (rnd + 1) % r.settings.checkpoint_every == 0 or r.finished:
                checkpoint = agg.checkpoint()
                # The history resumes with the model; accuracies still being
                # computed are filled in again after a restart (see resume).
                checkpoint.meta["history"] = [dict(h) for h in r.history]
                r.checkpoints.save(checkpoint)
                r.heads.prune(below=min(r.checkpoints.rounds()) - 1)
            m_round_s.set(time.perf_counter() - t0 + waited)
            if r.settings.evaluate:
                r.evaluating += 1
                evaluate_round(r, record, agg.params.clone())
            else:
                log_completed(record)
            r.phase_since = time.monotonic()
            r.aggregates_in = None
            changed = r.view() != before
        if changed:
            r.changed.fire()

    def publish(
        r: _Runtime,
        rnd: int,
        result: GlobalRoundResult,
        reference: torch.Tensor | None,
        updates: dict[int, dict[int, bytes]],
    ) -> None:
        """Write round ``rnd``'s artefacts (see protogalaxy.artefacts)."""
        state = r.agg.finished
        if result.record is None or state is None:
            return
        galaxies = {}
        for g, leaf in state.signed_leaves.items():
            galaxies[g] = state.artefacts_of(g, leaf)
        try:
            for g, served in updates.items():
                r.artefacts.write_updates(rnd, g, served)
            r.artefacts.write_round(
                rnd,
                record=result.record,
                galaxies=galaxies,
                reference=reference,
                misbehaviour=[m.to_dict() for m in result.misbehaved],
            )
            for records in r.evidence.pop(rnd, {}).values():
                r.artefacts.append_evidence(records)
        except OSError:
            _log.exception("round %d: its artefacts could not be written", rnd)

    def log_completed(record: dict[str, Any]) -> None:
        _log.warning(
            "round_completed",
            extra={"event_record": {"event": "round_completed", **record}},
        )

    def evaluate_round(r: _Runtime, record: dict[str, Any], flat: torch.Tensor) -> None:
        """Send a round's model to the evaluator; its accuracy and loss are filled
        into the round's history record when they come back (in round order)."""
        assert r.evaluator is not None

        def done(future: Future[tuple[float, float]]) -> None:
            acc: float | None
            loss: float | None
            try:
                acc, loss = future.result()
            except Exception:
                _log.exception("evaluation of round %s failed", record["round"])
                acc, loss = None, None
            with r.lock:
                record.update({"accuracy": acc, "loss": loss})
                r.evaluating -= 1
            if acc is not None:
                m_accuracy.set(acc)
            log_completed(record)

        r.evaluator.submit(_eval_params, flat).add_done_callback(done)

    def resume_evaluations(r: _Runtime) -> None:
        """Fill in the accuracy a restart interrupted: the checkpointed model is the
        last round's, so that one is evaluated again; an older round's model is
        gone, and its record says so (accuracy None)."""
        if not r.settings.evaluate:
            return
        applied = [h for h in r.history if not h.get("skipped")]
        for record in applied:
            if "accuracy" in record:
                continue
            if record is applied[-1]:
                r.evaluating += 1
                evaluate_round(r, record, r.agg.params.clone())
            else:
                record.update({"accuracy": None, "loss": None})

    async def drive(r: _Runtime) -> None:
        """Step when a galaxy sent something, and every ``poll_s`` for deadlines;
        fetch what the audits need (no lock held) and finish the round."""
        while not r.finished:
            ticket = r.poke.ticket()
            try:
                ready = await asyncio.to_thread(step, r)
                if ready is not None:
                    rnd, targets = ready
                    updates, unreachable = await fetch_updates(r, rnd, targets)
                    await asyncio.to_thread(finish, r, rnd, updates, unreachable)
                    continue
            except Exception:
                _log.exception("driver step failed")
            await Signal.wait(ticket, r.settings.poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal rt
        rt = _Runtime(settings, cfg)
        m_last_round.set(rt.agg.round - 1)  # a restart resumes mid-run
        if rt.evaluator is not None:  # start it (model, test set) during round 0
            rt.evaluator.submit(os.getpid)
        resume_evaluations(rt)
        task = asyncio.create_task(drive(rt))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if rt.evaluator is not None:
                _stop_evaluator(rt.evaluator)

    app = FastAPI(title="ProtoGalaxy global aggregator", lifespan=lifespan)
    install_error_handlers(
        app,
        service="global",
        registry=registry,
        context={},
        # aggregates, transcripts and batches are read with limits of their own
        streamed=lambda method, path: (
            method == "POST"
            and (
                "/aggregates/" in path
                or "/transcripts/" in path
                or path.endswith("/acks/batch")
            )
        ),
        run=settings.run_id,
    )

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(r: Rt) -> dict[str, Any]:
        return {"status": "ready", "round": r.agg.round}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(
            generate_latest(registry) + generate_latest(server.REGISTRY),
            media_type=CONTENT_TYPE_LATEST,
        )

    @app.get("/v1/identity")
    def identity(r: Rt) -> dict[str, Any]:
        """The global aggregator's public key and run (for display: parties pin the
        key from their configuration, never from here)."""
        return {
            "public_key": r.key.public_key.to_bytes().hex(),
            "run": r.settings.run_id,
            "galaxies": {
                str(g): k.to_bytes().hex() for g, k in r.agg.galaxy_keys.items()
            },
        }

    @app.get("/v1/status")
    async def status(
        request: Request,
        r: Rt,
        view: Annotated[str | None, Query(max_length=200)] = None,
        wait_s: Annotated[float, Query(ge=0, le=30)] = 0.0,
    ) -> dict[str, Any]:
        """The run's status. With ``view`` (from an earlier answer) and ``wait_s``,
        answer once the view differs from it or ``wait_s`` has passed: galaxies
        wait for the next thing to do without polling. A wait holds a connection:
        it needs the service or auditor token, and at most
        ``PG_MAX_LONG_POLLS`` wait at once (429 ``too_many_waiters``)."""
        if view is None or wait_s <= 0:
            return await asyncio.to_thread(locked_status, r)
        try:
            require_token(request, r.settings.service_token, what="service")
        except Rejected:
            require_token(request, r.settings.auditor_token, what="service or auditor")

        async def current() -> dict[str, Any]:
            return await asyncio.to_thread(locked_status, r)

        return await r.waiters.answer(request, view, wait_s, current)

    def locked_status(r: _Runtime) -> dict[str, Any]:
        with r.lock:  # a finished round and its history record appear together
            return _status(r)

    def _status(r: _Runtime) -> dict[str, Any]:
        return {
            "view": r.view(),
            "round": r.agg.round,
            "phase": r.agg.phase,
            "model_version": r.agg.round,
            "rounds": r.rounds,
            "finished": r.finished,
            # Rounds applied whose accuracy is still being computed; their history
            # records get "accuracy" and "loss" when it is done.
            "evaluating": r.evaluating,
            "history": r.history,
            "isolated": sorted(r.agg.isolated),
            # What this process holds of the round: a galaxy whose transcript or
            # aggregate is missing after a restart sends it again.
            "received": {
                "leaves": sorted(r.agg.leaves),
                "transcripts": sorted(r.agg.round_state.transcripts),
                "aggregates": sorted(r.agg.aggregates),
            },
            "model_digest": model_digest(r),
            "audit_log": {
                "size": r.agg.audit_log.size,
                "root": r.agg.audit_log.root.hex(),
            },
        }

    @app.get("/v1/model")
    def model(r: Rt) -> Response:
        """The global model with its version and the global aggregator's signature
        (``X-PG-Model-Signature``) over both: whoever relays it cannot change it."""
        with r.lock:
            body, version, signature = model_body(r)
        return Response(
            body,
            media_type="application/octet-stream",
            headers={
                "x-pg-model-version": str(version),
                "x-pg-model-signature": signature.hex(),
            },
        )

    @app.get("/v1/reference")
    def reference(r: Rt) -> Response:
        ref = r.agg.reference_direction
        if ref is None:
            return Response(status_code=204)
        return Response(
            encode_update({"direction": ref}), media_type="application/octet-stream"
        )

    @app.post("/v1/rounds/{rnd}/leaves", status_code=202)
    async def leaf(rnd: int, request: Request, r: Rt) -> dict[str, Any]:
        """A galaxy's root: ``{statement: <galaxy leaf>, signature}``, signed with the
        galaxy's key (401 otherwise; the token is checked before the body is read)."""
        require_token(request, r.settings.service_token, what="service")
        body = await read_json(request, JSON_LIMIT)
        return await run_in_threadpool(take_leaf, rnd, body, r)

    def take_leaf(rnd: int, body: Any, r: _Runtime) -> dict[str, Any]:
        signed = Signed.from_dict(GalaxyLeaf, body)
        galaxy_leaf = signed.statement
        if galaxy_leaf.round != rnd:
            raise WrongPhase(
                f"leaf for round {galaxy_leaf.round} posted to round {rnd}"
            )
        with r.lock:
            fresh = r.agg.submit_leaf(signed)
        r.poke.fire()
        return {"accepted": True, "duplicate": not fresh}

    @app.post("/v1/rounds/{rnd}/abstentions/{galaxy}", status_code=202)
    async def abstain(rnd: int, galaxy: int, request: Request, r: Rt) -> dict[str, Any]:
        """A galaxy had no commitments this round (``{statement, signature}``, signed
        with its key): the round need not wait for its root."""
        require_token(request, r.settings.service_token, what="service")
        body = await read_json(request, JSON_LIMIT)
        return await run_in_threadpool(take_abstention, rnd, galaxy, body, r)

    def take_abstention(
        rnd: int, galaxy: int, body: Any, r: _Runtime
    ) -> dict[str, Any]:
        signed = Signed.from_dict(Abstention, body)
        if (signed.statement.round, signed.statement.galaxy_id) != (rnd, galaxy):
            raise Rejected(
                "wrong_round",
                f"abstention for galaxy {signed.statement.galaxy_id} round "
                f"{signed.statement.round} posted for galaxy {galaxy} round {rnd}",
            )
        with r.lock:
            r.agg.submit_abstention(signed)
        r.poke.fire()
        return {"accepted": True}

    @app.get("/v1/rounds/{rnd}/head")
    def head(rnd: int, galaxy: int, r: Rt) -> dict[str, Any]:
        with r.lock:
            signed = r.agg.head if r.agg.round == rnd else None
            if signed is None:
                raise WrongPhase(f"round {rnd} has no signed head yet")
            return {
                "head": signed.to_dict(),
                "proof": r.agg.proof_for(galaxy).to_dict(),
            }

    def parse_ack(rnd: int, body: Any) -> Signed[Acknowledgement]:
        if not isinstance(body, dict):
            raise Rejected("malformed", "an acknowledgement is a JSON object")
        try:
            signed = Signed.from_dict(Acknowledgement, body)
        except (KeyError, TypeError, ValueError) as exc:
            raise Rejected("malformed", f"acknowledgement: {exc}"[:500]) from None
        if signed.statement.round != rnd:
            raise Rejected(
                "wrong_round",
                f"an acknowledgement of round {signed.statement.round} posted to "
                f"round {rnd}",
            )
        return signed

    @app.post("/v1/rounds/{rnd}/acks", status_code=202)
    async def ack(rnd: int, request: Request, r: Rt) -> dict[str, Any]:
        """A galaxy's signed acknowledgement of a client's reveal, forwarded by the
        client (no token: clients hold none; the galaxy's signature is what counts):
        the galaxy's transcript of the round must then take that reveal. The body
        is at most ``ACK_BYTES`` (413 before it is read whole)."""
        signed = parse_ack(rnd, await read_json(request, ACK_BYTES))

        def take() -> bool:  # the round lock may be held by a finishing round
            with r.lock:
                return r.agg.submit_ack(signed)

        fresh = await run_in_threadpool(take)
        return {"accepted": True, "duplicate": not fresh}

    @app.post("/v1/rounds/{rnd}/acks/batch")
    async def ack_batch(rnd: int, request: Request, r: Rt) -> dict[str, Any]:
        """Many acknowledgements in one request (a runner forwarding its clients'):
        each checked and taken as ``POST .../acks`` would, answered in order."""
        items = await read_batch(request, ACK_BYTES, "acknowledgements")

        def one(body: Any) -> dict[str, Any]:
            signed = parse_ack(rnd, body)
            with r.lock:
                fresh = r.agg.submit_ack(signed)
            return {"client_id": signed.statement.client_id, "duplicate": not fresh}

        return {"results": await run_in_threadpool(run_batch, request, items, one)}

    @app.post("/v1/rounds/{rnd}/transcripts/{galaxy}", status_code=202)
    async def transcript(
        rnd: int, galaxy: int, request: Request, r: Rt
    ) -> dict[str, Any]:
        """A galaxy's signed transcript of the round, the reputation states it
        starts and ends with, and its signed evidence records (the token first,
        then at most ``PG_MAX_TRANSCRIPT_BYTES``, parsed off the event loop)."""
        require_token(request, r.settings.service_token, what="service")
        body = await read_json(request, r.settings.max_transcript_bytes)
        return await run_in_threadpool(take_transcript, rnd, galaxy, body, r)

    def take_transcript(
        rnd: int, galaxy: int, body: Any, r: _Runtime
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise Rejected("malformed", "a transcript upload is a JSON object")
        try:
            doc = SignedDocument.from_dict(body["transcript"], kind="transcript")
            before, after = body["reputation_before"], body["reputation_after"]
            evidence = body.get("evidence", [])
        except (KeyError, TypeError) as exc:
            raise Rejected("malformed", f"transcript: {exc}") from None
        if (doc.body.get("round"), doc.body.get("galaxy")) != (rnd, galaxy):
            raise Rejected(
                "wrong_round", f"a transcript posted for galaxy {galaxy} round {rnd}"
            )
        if not isinstance(evidence, list) or not all(
            isinstance(e, dict) and e.get("round") == rnd and e.get("galaxy") == galaxy
            for e in evidence
        ):
            raise Rejected("malformed", "evidence must be this galaxy's, this round's")
        with r.lock:
            fresh = r.agg.submit_transcript(doc, before, after)
            if fresh:
                r.evidence.setdefault(rnd, {})[galaxy] = evidence
        r.poke.fire()
        return {"accepted": True, "duplicate": not fresh}

    @app.get("/v1/assignment")
    def assignment(r: Rt) -> dict[str, Any]:
        """The signed placement of the clients (which galaxies are isolated) and the
        reputations moved clients start with: verify it with the pinned key."""
        with r.lock:
            return r.agg.assignment_document().to_dict()

    # -- the audit log, for anyone (RFC 9162 proofs over the signed records) ------

    def log_size(r: _Runtime, size: int | None, what: str) -> int:
        n = r.agg.audit_log.size
        if size is None:
            return n
        if not 0 <= size <= n:
            raise Rejected("not_found", f"{what} {size}: the log has {n} entries")
        return size

    @app.get("/v1/audit-log")
    def audit_log_head(r: Rt) -> dict[str, Any]:
        """The log's size and root, signed by the global aggregator (kind
        ``log-head``): two different heads for one size are proof of a fork."""
        with r.lock:
            log = r.agg.audit_log
            body = {"run": r.settings.run_id, "size": log.size, "root": log.root.hex()}
        return sign_document(r.key, "log-head", body, run=r.settings.run_id).to_dict()

    @app.get("/v1/audit-log/entries")
    def audit_log_entries(
        r: Rt,
        start: Annotated[int, Query(ge=0)] = 0,
        end: Annotated[int | None, Query(ge=0)] = None,
    ) -> dict[str, Any]:
        """The signed round records ``start`` to ``end`` (exclusive), at most
        256 a request."""
        with r.lock:
            n = r.agg.audit_log.size
            stop = min(n, start + 256 if end is None else end, start + 256)
            if start > n or stop < start:
                raise Rejected("not_found", f"entries {start}..{end}: the log has {n}")
            entries = [r.agg.audit_log.entry(i).to_dict() for i in range(start, stop)]
        return {"start": start, "size": n, "entries": entries}

    @app.get("/v1/audit-log/inclusion/{index}")
    def audit_log_inclusion(
        index: int, r: Rt, size: Annotated[int | None, Query(ge=1)] = None
    ) -> dict[str, Any]:
        """The inclusion proof of entry ``index`` in the log of ``size`` entries
        (default: now)."""
        with r.lock:
            n = log_size(r, size, "size")
            if not 0 <= index < n:
                raise Rejected("not_found", f"entry {index}: the log has {n} entries")
            proof = r.agg.audit_log.inclusion_proof(index, n)
            root = r.agg.audit_log.head(n).root
        return {
            "leaf_index": proof.leaf_index,
            "tree_size": proof.tree_size,
            "path": [h.hex() for h in proof.path],
            "root": root.hex(),
        }

    @app.get("/v1/audit-log/consistency")
    def audit_log_consistency(
        r: Rt,
        first: Annotated[int, Query(ge=1)],
        second: Annotated[int | None, Query(ge=1)] = None,
    ) -> dict[str, Any]:
        """The consistency proof between the log of ``first`` entries and the
        log of ``second`` (default: now), with both roots."""
        with r.lock:
            new = log_size(r, second, "second")
            old = log_size(r, first, "first")
            if old > new:
                raise Rejected("malformed", f"first {old} is past second {new}")
            log = r.agg.audit_log
            proof = log.consistency_proof(old, new)
            roots = (log.head(old).root, log.head(new).root)
        return {
            "first": old,
            "second": new,
            "first_root": roots[0].hex(),
            "second_root": roots[1].hex(),
            "proof": [h.hex() for h in proof],
        }

    @app.get("/v1/audit/files")
    def audit_files(request: Request, r: Rt) -> list[str]:
        """The run's published artefacts (protogalaxy audit --url), for auditors:
        only the published layout, never another file of the data directory."""
        require_token(request, r.settings.auditor_token, what="auditor")
        return published(r.artefacts.root)

    @app.get("/v1/audit/files/{path:path}")
    def audit_file(path: str, request: Request, r: Rt) -> Response:
        require_token(request, r.settings.auditor_token, what="auditor")
        root = r.artefacts.root
        target = root / path
        if not is_published(path) or target.is_symlink() or not target.is_file():
            raise Rejected("not_found", f"no artefact {path}")
        return Response(target.read_bytes(), media_type="application/octet-stream")

    @app.post("/v1/rounds/{rnd}/aggregates/{galaxy}")
    async def aggregate(
        rnd: int,
        galaxy: int,
        request: Request,
        response: Response,
        r: Rt,
        x_pg_statement: Annotated[str, Header(max_length=512)],
        x_pg_signature: Annotated[str, Header(max_length=256)],
    ) -> dict[str, Any]:
        """A galaxy's aggregate (body ``PGT1``, one float32 tensor ``aggregate``)
        with its signed statement (headers, hex): root, tree size, weight and the
        digest of the values, signed with the galaxy's key."""
        require_token(request, r.settings.service_token, what="service")
        try:
            signed = Signed(
                AggregateStatement.from_bytes(bytes.fromhex(x_pg_statement)),
                bytes.fromhex(x_pg_signature),
            )
        except ValueError as exc:
            raise Rejected("malformed", f"aggregate statement: {exc}") from None
        if (signed.statement.round, signed.statement.galaxy_id) != (rnd, galaxy):
            raise Rejected(
                "wrong_round",
                f"statement for galaxy {signed.statement.galaxy_id} round "
                f"{signed.statement.round} posted for galaxy {galaxy} round {rnd}",
            )
        body = await read_body(request, r.settings.max_update_bytes)
        tensors = decode_update(body, max_bytes=r.settings.max_update_bytes)
        vector = tensors.get("aggregate")
        if vector is None or len(tensors) != 1:
            raise Rejected("shape", "the body must hold one tensor named 'aggregate'")
        with r.lock:
            fresh = r.agg.submit_aggregate(signed, vector)
        r.poke.fire()
        response.status_code = 202 if fresh else 200
        return {"accepted": True, "duplicate": not fresh}

    return app

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
import logging
import multiprocessing
import os
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from protogalaxy.codec import decode_update, encode_update
from protogalaxy.config import SimulationConfig, load_config
from protogalaxy.crypto.identity import SigningKey
from protogalaxy.crypto.keyring import parse_keyring
from protogalaxy.crypto.statements import (
    Abstention,
    AggregateStatement,
    ModelStatement,
    Signed,
    sign_statement,
)
from protogalaxy.crypto.trees import GalaxyLeaf
from protogalaxy.defense.pipeline import GlobalDefense
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.learning.models import build_model
from protogalaxy.learning.training import evaluate
from protogalaxy.protocol.checkpoint import CheckpointDir
from protogalaxy.protocol.galaxy import Rejected, WrongPhase
from protogalaxy.protocol.global_aggregator import GlobalAggregator
from protogalaxy.spec import UpdateSpec
from services.common import (
    NotReady,
    Signal,
    env,
    install_error_handlers,
    read_body,
    require_token,
)

__all__ = ["GlobalSettings", "create_app"]

_log = logging.getLogger("protogalaxy.global")


@dataclass(frozen=True)
class GlobalSettings:
    data_dir: str
    galaxies: int
    service_token: str
    run_id: str
    #: keyring of the galaxies' public keys (``<galaxy>,<hex>`` lines)
    galaxy_keys_file: str
    config_path: str | None = None
    rounds: int | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    leaf_deadline_s: float = 120.0
    aggregate_deadline_s: float = 120.0
    max_update_bytes: int = 64 << 20
    evaluate: bool = True
    poll_s: float = 0.25
    signing_key_file: str | None = None

    @classmethod
    def from_env(cls) -> "GlobalSettings":
        rounds = env("PG_ROUNDS", "")
        return cls(
            data_dir=env("PG_DATA_DIR"),
            galaxies=int(env("PG_GALAXIES")),
            service_token=env("PG_SERVICE_TOKEN"),
            run_id=env("PG_RUN_ID"),
            galaxy_keys_file=env("PG_GALAXY_KEYS_FILE"),
            config_path=env("PG_CONFIG", "") or None,
            rounds=int(rounds) if rounds else None,
            checkpoint_every=int(env("PG_CHECKPOINT_EVERY", "1")),
            keep_checkpoints=int(env("PG_KEEP_CHECKPOINTS", "3")),
            leaf_deadline_s=float(env("PG_LEAF_DEADLINE_S", "120")),
            aggregate_deadline_s=float(env("PG_AGGREGATE_DEADLINE_S", "120")),
            max_update_bytes=int(env("PG_MAX_UPDATE_BYTES", str(64 << 20))),
            evaluate=env("PG_EVALUATE", "1") == "1",
            poll_s=float(env("PG_POLL_S", "0.25")),
            signing_key_file=env("PG_SIGNING_KEY_FILE", "") or None,
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


class _Runtime:
    def __init__(self, settings: GlobalSettings, config: SimulationConfig) -> None:
        self.settings = settings
        self.config = config
        self.rounds = settings.rounds or config.training.rounds
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
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
        self.agg = GlobalAggregator(
            key=self.key,
            galaxy_keys={g: keyring[g] for g in range(settings.galaxies)},
            galaxy_sizes={
                g: len(members) for g, members in config.galaxy_members().items()
            },
            run=settings.run_id,
            params=self.spec.flatten(params),
            defense=GlobalDefense(config.defense.build()),
            server_lr=config.training.server_lr,
            server_momentum=config.training.server_momentum,
        )
        #: one record per round applied (or skipped), checkpointed with the model
        self.history: list[dict[str, Any]] = []
        latest = self.checkpoints.latest()
        if latest is not None:
            self.agg.restore(latest)
            self.history = list(latest.meta.get("history", []))
            _log.warning(
                "resumed",
                extra={"event_record": {"event": "resumed", "round": latest.round}},
            )
        self.phase_since = time.monotonic()
        #: the served model: PGT1 body, version, signature (see model_body)
        self.model_cache: tuple[bytes, int, bytes] | None = None
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

    def view(self) -> str:
        """What galaxies wait on: it changes when they may have something to do."""
        return f"{self.boot}:{self.agg.round}:{self.agg.phase}:{self.finished}"

    @property
    def finished(self) -> bool:
        return self.agg.round >= self.rounds


def create_app(
    settings: GlobalSettings, *, config: SimulationConfig | None = None
) -> FastAPI:
    cfg = config or load_config(settings.config_path)
    registry = CollectorRegistry()
    m_rounds = Counter(
        "protogalaxy_global_rounds_completed_total", "Rounds applied", registry=registry
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
        return r.model_cache

    def step(r: _Runtime) -> None:
        with r.lock:
            before = r.view()
            _step(r)
            changed = r.view() != before
        if changed:
            r.changed.fire()

    def _step(r: _Runtime) -> None:
        if r.finished:
            return
        agg = r.agg
        rnd = agg.round
        waited = time.monotonic() - r.phase_since
        if agg.phase == "leaves":
            n = len(agg.leaves)
            answered = n + len(agg.abstained)
            if answered >= r.settings.galaxies or waited > r.settings.leaf_deadline_s:
                if n:
                    agg.close_leaves(rnd)
                else:
                    agg.skip_round(rnd)
                    r.history.append(
                        {"round": rnd, "galaxies": [], "excluded": {}, "skipped": True}
                    )
                r.phase_since = time.monotonic()
        elif agg.phase == "aggregates":
            expected = set(agg.leaves)
            have = set(agg.aggregates)
            if have >= expected or waited > r.settings.aggregate_deadline_s:
                t0 = time.perf_counter()
                result = agg.finish_round(rnd)
                m_rounds.inc()
                m_excluded.inc(len(result.report.excluded))
                record: dict[str, Any] = {
                    "round": rnd,
                    "galaxies": sorted(have),
                    "excluded": result.report.excluded,
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
                m_round_s.set(time.perf_counter() - t0 + waited)
                if r.settings.evaluate:
                    r.evaluating += 1
                    evaluate_round(r, record, agg.params.clone())
                else:
                    log_completed(record)
                r.phase_since = time.monotonic()

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
        """Step when a galaxy sent something, and every ``poll_s`` for deadlines."""
        while not r.finished:
            ticket = r.poke.ticket()
            try:
                await asyncio.to_thread(step, r)
            except Exception:
                _log.exception("driver step failed")
            await Signal.wait(ticket, r.settings.poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal rt
        rt = _Runtime(settings, cfg)
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
    install_error_handlers(app, service="global", registry=registry, context={})

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(r: Rt) -> dict[str, Any]:
        return {"status": "ready", "round": r.agg.round}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

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
        r: Rt,
        view: Annotated[str | None, Query(max_length=200)] = None,
        wait_s: Annotated[float, Query(ge=0, le=30)] = 0.0,
    ) -> dict[str, Any]:
        """The run's status. With ``view`` (from an earlier answer) and ``wait_s``,
        answer once the view differs from it or ``wait_s`` has passed: galaxies
        wait for the next thing to do without polling."""
        deadline = time.monotonic() + wait_s
        while True:
            ticket = r.changed.ticket()
            out = await asyncio.to_thread(locked_status, r)
            left = deadline - time.monotonic()
            if view is None or out["view"] != view or left <= 0:
                return out
            await Signal.wait(ticket, left)

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
    def leaf(rnd: int, body: dict[str, Any], request: Request, r: Rt) -> dict[str, Any]:
        """A galaxy's root: ``{statement: <galaxy leaf>, signature}``, signed with the
        galaxy's key (401 otherwise)."""
        require_token(request, r.settings.service_token, what="service")
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
    def abstain(
        rnd: int, galaxy: int, body: dict[str, Any], request: Request, r: Rt
    ) -> dict[str, Any]:
        """A galaxy had no commitments this round (``{statement, signature}``, signed
        with its key): the round need not wait for its root."""
        require_token(request, r.settings.service_token, what="service")
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

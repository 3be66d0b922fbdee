"""What every ProtoGalaxy service shares: settings from the environment, bounded
body reading, one mapping of domain errors to status codes, metrics, bearer tokens.

Domain errors map to status codes in one place (:func:`install_error_handlers`):
wrong round or phase 409, unknown client 404, bad signature 401, a client id of
another galaxy or without a provisioned credential 403, too large 413,
any other layer-1 rejection 422, malformed input 400/422, not ready 503. Every
rejection is logged as one JSON line and counted in
``protogalaxy_<service>_rejected_total{reason}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from protogalaxy.crypto.errors import VerificationError
from protogalaxy.protocol.galaxy import Rejected, UnknownClient, WrongPhase

__all__ = [
    "AUDIT_BATCH_BYTES",
    "MAX_BATCH",
    "RUN_HEADER",
    "NotReady",
    "Pump",
    "Signal",
    "content_length",
    "env",
    "install_error_handlers",
    "read_batch",
    "read_body",
    "read_json",
    "require_token",
    "run_batch",
]

_log = logging.getLogger("protogalaxy.http")

#: the header that names the run a request is for, and the run that answers
RUN_HEADER = "x-pg-run"

_STATUS = {
    "bad_signature": 401,
    "wrong_galaxy": 403,
    "not_enrolled": 403,
    "unknown_client": 404,
    "not_found": 404,
    "duplicate": 409,
    "wrong_round": 409,
    "too_large": 413,
    "too_many_waiters": 429,
    "not_sampled": 403,
    "length_required": 411,
}


#: the reason of a plain HTTP refusal, by status
_HTTP_REASONS = {
    400: "malformed",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "too_large",
}


class NotReady(Exception):
    """The service cannot answer yet (store unreachable, no model)."""


class Signal:
    """Wakes coroutines on one event loop when something changed; :meth:`fire` is
    safe from any thread (FastAPI runs plain ``def`` handlers in a thread pool).

    A waiter takes a :meth:`ticket` *before* looking at the state it waits on and
    then waits on that ticket, so a change made in between is never missed.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        if threading.get_ident() == self._thread:
            self._fire()
        else:
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    @staticmethod
    async def wait(ticket: asyncio.Event, timeout: float) -> bool:
        """True when fired since ``ticket`` was taken, False after ``timeout``."""
        try:
            await asyncio.wait_for(ticket.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @staticmethod
    async def wait_for_peer(
        request: Request, ticket: asyncio.Event, timeout: float
    ) -> str:
        """Like :meth:`wait`, but also over the peer hanging up: ``"fired"``,
        ``"timeout"`` or ``"gone"``. A long poll whose peer left must end at once
        and give back its slot: otherwise a client opening and closing one
        connection after another holds every waiter slot (and, through the
        server's concurrency limit, takes the service off the air)."""

        async def hung_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        fired = asyncio.ensure_future(ticket.wait())
        gone = asyncio.ensure_future(hung_up())
        try:
            done, _ = await asyncio.wait(
                {fired, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            fired.cancel()
            gone.cancel()
        if gone in done:
            return "gone"
        return "fired" if fired in done else "timeout"


class LongPolls:
    """Requests waiting for a view to change (long polls), at most ``limit`` at
    once; used on the event loop only."""

    def __init__(self, changed: Signal, limit: int) -> None:
        self.changed = changed  # fired when the view may have changed
        self.limit = limit
        self.waiting = 0

    async def answer(
        self,
        request: Request,
        view: str,
        wait_s: float,
        current: Callable[[], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """``current()`` once its ``"view"`` differs from ``view`` or ``wait_s``
        has passed (429 ``too_many_waiters`` beyond the limit). A wait whose peer
        hangs up ends at once and gives its slot back."""
        if self.waiting >= self.limit:
            raise Rejected(
                "too_many_waiters",
                f"{self.waiting} long polls are waiting; ask again without wait_s",
            )
        self.waiting += 1
        try:
            deadline = time.monotonic() + wait_s
            while True:
                ticket = self.changed.ticket()
                out = await current()
                left = deadline - time.monotonic()
                if out["view"] != view or left <= 0:
                    return out
                if await Signal.wait_for_peer(request, ticket, left) == "gone":
                    return out  # nobody reads it; the slot is free again
        finally:
            self.waiting -= 1


def env(name: str, default: str | None = None) -> str:
    """``$name``, else the contents of the file ``$name_FILE`` names (a mounted
    Secret: credentials stay out of the environment, which child processes and
    crash reports inherit), else ``default``."""
    value = os.environ.get(name)
    if value is None and os.environ.get(f"{name}_FILE"):
        path = os.environ[f"{name}_FILE"]
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RuntimeError(f"{name}_FILE={path}: cannot read it ({exc})") from None
    if value is None:
        value = default
    if value is None:
        raise RuntimeError(f"environment variable {name} (or {name}_FILE) is required")
    return value


def content_length(request: Request, limit: int) -> int | None:
    """The declared body size (None without one); 400 when it is not a size, 413
    when it exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        expected = int(declared)
    except ValueError:
        raise HTTPException(400, "Content-Length is not an integer") from None
    if expected < 0:
        raise HTTPException(400, "Content-Length is negative")
    if expected > limit:
        raise Rejected(
            "too_large", f"body of {expected} bytes exceeds the limit of {limit}"
        )
    return expected


async def read_json(request: Request, limit: int) -> Any:
    """A JSON body of at most ``limit`` bytes: 413 as soon as it is larger (before
    reading it whole), 422 ``malformed`` when it is not JSON. Bodies above 64 KiB
    are parsed in a worker thread, so the event loop keeps answering."""
    raw = bytes(await read_body(request, limit))
    try:
        if len(raw) > 1 << 16:
            return await run_in_threadpool(json.loads, raw)
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Rejected("malformed", f"the body is not JSON: {exc!r:.200}") from None


async def read_body(
    request: Request,
    limit: int,
    on_data: Callable[[memoryview], object] | None = None,
    *,
    batch: int = 1 << 20,
) -> memoryview:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes
    (by Content-Length before reading, or while streaming without one).

    Each chunk is copied into place as it arrives. ``on_data`` gets the body as it
    fills, in consecutive pieces of at least ``batch`` bytes (the last may be
    shorter): views of the returned buffer, which is never written behind them.
    Without a Content-Length it gets each chunk as it comes.
    """
    expected = content_length(request, limit)
    # Uninitialized memory: its pages are touched only as the chunks land, so the
    # one copy of the body is spread over the transfer.
    body = memoryview(np.empty(expected, np.uint8).data) if expected else None
    grown = bytearray()
    size = handed = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        end = size + len(chunk)
        if end > limit:
            raise Rejected("too_large", f"body exceeds the limit of {limit} bytes")
        if body is None:  # no Content-Length (chunked transfer)
            grown += chunk
            if on_data is not None:
                on_data(memoryview(chunk))
        elif end > len(body):
            raise HTTPException(400, f"body exceeds its Content-Length of {expected}")
        else:
            body[size:end] = chunk
            if on_data is not None and end - handed >= batch:
                on_data(body[handed:end])
                handed = end
        size = end
    if expected is not None and size != expected:
        raise HTTPException(
            400, f"body of {size} bytes, Content-Length declared {expected}"
        )
    if body is None:
        return memoryview(grown)
    if on_data is not None and size > handed:
        on_data(body[handed:size])
    return body


class Pump:
    """Runs ``sinks`` over a body's pieces, in order, on a thread of its own, so
    work that releases the GIL (hashing, socket writes) overlaps the transfer
    instead of following it. The pieces must not change until the pump is done.

    A sink's error stops the sinks; :meth:`close` raises it. :meth:`then` runs a
    clean-up once the thread has finished, whether or not anyone waits for it.
    """

    def __init__(self, *sinks: Callable[[memoryview], object]) -> None:
        self._sinks = sinks
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed = False
        threading.Thread(target=self._run, name="pump", daemon=True).start()

    def feed(self, piece: memoryview) -> None:
        self._queue.put(piece)

    async def close(self) -> None:
        """Wait until every piece fed so far went through the sinks."""
        self._end()
        await asyncio.wrap_future(self._done)

    def then(self, clean_up: Callable[[], object]) -> None:
        self._end()
        self._done.add_done_callback(lambda _: clean_up())

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _run(self) -> None:
        failure: BaseException | None = None
        while (piece := self._queue.get()) is not None:
            if failure is not None:
                continue  # drain: the feeder does not know yet
            try:
                for sink in self._sinks:
                    sink(piece)
            except BaseException as exc:  # handed to whoever closes the pump
                failure = exc
        if failure is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(failure)


def require_token(
    request: Request, expected: str, *, what: str, sha256: str = ""
) -> None:
    """Bearer-token check in constant time; 401 when missing or wrong.

    ``sha256``: the hex SHA-256 of the token, checked instead of ``expected``
    when given, so a service that only checks a token never holds it (a galaxy
    holding the auditors' token could read every galaxy's published updates)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if sha256:
        presented = hashlib.sha256(token.encode()).hexdigest().encode()
        ok = hmac.compare_digest(presented, sha256.strip().lower().encode())
    else:
        # An unset token admits nobody (not the empty token).
        ok = bool(expected) and hmac.compare_digest(token.encode(), expected.encode())
    if scheme.lower() != "bearer" or not ok:
        raise Rejected("bad_signature", f"a valid {what} bearer token is required")


class ErrorBody(BaseModel):
    """Every refusal of both services: a reason (a fixed word, counted by it in
    ``/metrics``) and a human-readable detail."""

    error: str
    detail: str


#: what any endpoint may answer besides its own success (in the OpenAPI document)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        400: "malformed input (`malformed`), or the client went away",
        401: "a bad signature or token (`bad_signature`, `verification_failed`)",
        403: "not this galaxy's client (`wrong_galaxy`, `not_enrolled`)",
        404: "nothing of that name (`not_found`, `unknown_client`)",
        409: "wrong round or phase, a duplicate (`wrong_phase`, `duplicate`)",
        411: "a body without a Content-Length (`length_required`)",
        413: "a body over its limit (`too_large`), refused before it is read",
        422: "a value that fails a check (`malformed`, `shape`, `dtype`, ...)",
        429: "too many long polls waiting (`too_many_waiters`)",
        503: "not ready, or the store is down (`not_ready`, `store_unavailable`)",
    }.items()
}

#: the largest JSON body of a request with no limit of its own (roots, abstentions,
#: commitments, registrations are a few hundred bytes)
JSON_LIMIT = 8 << 10


#: the most items one batch request carries (commitments, receipt ids, acks,
#: audit updates)
MAX_BATCH = 256

#: how much one galaxy answer to a batch of audit updates carries (at least one
#: update, whatever its size)
AUDIT_BATCH_BYTES = 64 << 20

#: the status and reason of a refused request (or batch item), by error type;
#: a ``Rejected`` carries its own reason (``_STATUS``); anything else (a store
#: that is down, a service not ready) fails the whole request
_ITEM_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (WrongPhase, 409, "wrong_phase"),
    (UnknownClient, 404, "unknown_client"),
    (VerificationError, 401, "verification_failed"),
    (ValueError, 400, "malformed"),
)


def _refusal(exc: Exception) -> tuple[int, str] | None:
    if isinstance(exc, Rejected):
        return _STATUS.get(exc.reason, 422), exc.reason
    for error, status, reason in _ITEM_ERRORS:
        if isinstance(exc, error):
            return status, reason
    return None


async def read_batch(request: Request, item_bytes: int, what: str) -> list[Any]:
    """A batch body ``{"items": [...]}`` of 1 to ``MAX_BATCH`` items, at most
    ``item_bytes`` each on average (413 before it is read whole otherwise)."""
    body = await read_json(request, MAX_BATCH * item_bytes)
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise Rejected(
            "malformed",
            f'a batch of {what} is {{"items": [...]}} with 1 to {MAX_BATCH} items',
        )
    return items


def run_batch(
    request: Request, items: list[Any], one: Callable[[Any], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``one(item)`` for each item, in order: its answer, or its refusal as the
    single request would have had it (status, reason, detail), counted by reason
    and logged once for the batch. An error that is not a refusal (the store
    down) fails the whole batch, and the sender retries it: every item is
    idempotent."""
    out: list[dict[str, Any]] = []
    refused: list[tuple[int, int, str, str]] = []
    try:
        for i, item in enumerate(items):
            try:
                out.append({"ok": True, **one(item)})
            except Exception as exc:
                refusal = _refusal(exc)
                if refusal is None:
                    raise
                status, reason = refusal
                detail = str(exc)[:500]
                refused.append((i, status, reason, detail))
                out.append(
                    {"ok": False, "status": status, "error": reason, "detail": detail}
                )
    finally:
        if refused:
            request.app.state.refuse_items(request, refused, len(items))
    return out


def install_error_handlers(
    app: FastAPI,
    *,
    service: str,
    registry: CollectorRegistry,
    context: dict[str, Any],
    unavailable: tuple[type[Exception], ...] = (),
    streamed: Callable[[str, str], bool] = lambda method, path: False,
    json_limit: int = JSON_LIMIT,
    run: str | None = None,
) -> Counter:
    """Map domain errors to status codes; log and count each rejection.

    ``unavailable``: errors of a backing store that is down or too slow (503,
    ``store_unavailable``), so a client retries instead of giving up.

    Every request body is capped at ``json_limit`` bytes before any of it is
    read (411 without a Content-Length, 413 above the limit), except for the
    requests ``streamed(method, path)`` names: they read their bodies with
    limits of their own (:func:`read_body`, :func:`read_json`).

    ``run``: the run this service serves. Every answer names it (``x-pg-run``),
    and a request that names another run (a client or galaxy of the next run
    reaching a pod of the last one during a ``helm upgrade``) gets 409
    ``wrong_run`` before anything reads it; the sender retries until the new
    pods answer. (Signatures bind the run too: this makes the mix-up visible
    and harmless, not just unforgeable.)
    """
    rejected = Counter(
        f"protogalaxy_{service}_rejected_total",
        "Requests refused, by reason",
        ["reason"],
        registry=registry,
    )

    def refuse(request: Request, status: int, reason: str, detail: str) -> JSONResponse:
        rejected.labels(reason=reason).inc()
        _log.warning(
            "request_rejected",
            extra={
                "event_record": {
                    "event": "request_rejected",
                    "reason": reason,
                    "status": status,
                    "path": request.url.path,
                    "detail": detail,
                    **context,
                }
            },
        )
        return JSONResponse({"error": reason, "detail": detail}, status_code=status)

    def refuse_items(
        request: Request, refused: list[tuple[int, int, str, str]], of: int
    ) -> None:
        """A batch's refused items (index, status, reason, detail): each counted
        by its reason, one log line for the batch (a line per item would let a
        small body write a large log)."""
        reasons: dict[str, int] = {}
        for _, _, reason, _ in refused:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in reasons.items():
            rejected.labels(reason=reason).inc(n)
        _log.warning(
            "batch_items_rejected",
            extra={
                "event_record": {
                    "event": "batch_items_rejected",
                    "path": request.url.path,
                    "items": of,
                    "rejected": len(refused),
                    "reasons": reasons,
                    "first": [
                        {"item": i, "status": st, "reason": rs, "detail": d[:200]}
                        for i, st, rs, d in refused[:3]
                    ],
                    **context,
                }
            },
        )

    app.state.refuse_items = refuse_items

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
        return refuse(request, _STATUS.get(exc.reason, 422), exc.reason, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refuse(request, 422, "malformed", str(exc.errors())[:500])

    # Starlette's own (unknown route, wrong method, a body FastAPI could not
    # parse) as well as ours: every refusal in the one format, logged, counted.
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = _HTTP_REASONS.get(exc.status_code, "http_error")
        return refuse(request, exc.status_code, reason, str(exc.detail))

    def answer(status: int, reason: str, *, name_it: bool = False) -> Any:
        """A handler answering every error of a kind with one status and reason;
        ``name_it``: the detail starts with the error's type (a store's errors)."""

        async def handler(request: Request, exc: Exception) -> JSONResponse:
            detail = f"{type(exc).__name__}: {exc}" if name_it else str(exc)
            return refuse(request, status, reason, detail)

        return handler

    fixed: dict[type[Exception], Any] = {
        # The peer went away mid-body (or was cut off by services.server's
        # timeouts): nobody reads the answer, but it is logged and counted.
        ClientDisconnect: answer(400, "client_disconnected"),
        **{error: answer(status, reason) for error, status, reason in _ITEM_ERRORS},
        NotReady: answer(503, "not_ready"),
    }
    for error in unavailable:
        fixed[error] = answer(503, "store_unavailable", name_it=True)
    for error, handler in fixed.items():
        app.add_exception_handler(error, handler)
    # Routes declared after this list the error responses in the OpenAPI document.
    app.router.responses.update(ERROR_RESPONSES)

    class _BodyLimit:
        """Refuses an oversized body from its Content-Length, before the
        framework reads (and parses) any of it."""

        def __init__(self, app: Any) -> None:
            self.inner = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if (
                scope["type"] != "http"
                or scope["method"] in ("GET", "HEAD")
                or streamed(scope["method"], scope["path"])
            ):
                await self.inner(scope, receive, send)
                return
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length")
            encoded = b"transfer-encoding" in headers
            request = Request(scope)
            if encoded:
                # With a Transfer-Encoding the body is not framed by its
                # Content-Length (it wins over one): the size would be a claim.
                response = (
                    refuse(
                        request, 411, "length_required", "a Content-Length is required"
                    )
                    if declared is None
                    else refuse(
                        request,
                        400,
                        "malformed",
                        "Transfer-Encoding with a Content-Length is not accepted",
                    )
                )
                await response(scope, receive, send)
                return
            try:
                size = int(declared or b"0")
            except ValueError:
                size = -1
            if size < 0:
                response = refuse(
                    request, 400, "malformed", "Content-Length is not a size"
                )
                await response(scope, receive, send)
                return
            if size > json_limit:
                response = refuse(
                    request,
                    413,
                    "too_large",
                    f"body of {size} bytes exceeds the limit of {json_limit}",
                )
                await response(scope, receive, send)
                return
            await self.inner(scope, receive, send)

    app.add_middleware(_BodyLimit)

    requests = Counter(
        f"protogalaxy_{service}_http_requests_total",
        "HTTP requests received, by method (the request rate a service carries)",
        ["method"],
        registry=registry,
    )

    class _Count:
        def __init__(self, app: Any) -> None:
            self.inner = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                method = scope["method"]
                known = ("GET", "HEAD", "POST", "PUT", "DELETE")
                requests.labels(method=method if method in known else "other").inc()
            await self.inner(scope, receive, send)

    app.add_middleware(_Count)

    if run is not None:
        this_run: str = run
        ours = run.encode()

        class _RunCheck:
            def __init__(self, app: Any) -> None:
                self.inner = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await self.inner(scope, receive, send)
                    return
                theirs = dict(scope.get("headers") or []).get(RUN_HEADER.encode())
                if theirs is not None and theirs != ours:
                    response = refuse(
                        Request(scope),
                        409,
                        "wrong_run",
                        f"this {service} serves run {run!r}, the request is for run "
                        f"{theirs.decode('latin-1')[:80]!r}",
                    )
                    response.headers[RUN_HEADER] = this_run
                    await response(scope, receive, send)
                    return

                async def named(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        message["headers"] = [
                            *message.get("headers", []),
                            (RUN_HEADER.encode(), ours),
                        ]
                    await send(message)

                await self.inner(scope, receive, named)

        app.add_middleware(_RunCheck)
    return rejected

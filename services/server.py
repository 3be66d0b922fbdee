"""The HTTP server's own limits, below the application: connections per peer, and
how long a peer may take to send a request's headers and each piece of its body.

uvicorn limits only the total (``limit_concurrency``, then 503 for everyone), and
waits for headers and bodies as long as a peer likes: 256 idle or half-sent
connections from one peer held a service at 503 for as long as they stayed open,
its own galaxies' requests included. :func:`guarded_protocol` makes an h11
protocol class that

- refuses a connection beyond ``max_per_peer`` open ones from the same address
  (answered 503 ``too_many_connections`` in the project's error format, then
  closed), so one peer cannot take the slots of the others;
- closes a connection whose request headers are not complete ``header_timeout_s``
  after it opened (or after the previous response): a slow-loris sender;
- closes a connection whose request body stalls for ``body_idle_timeout_s``
  between two pieces: the handler then sees the client disconnect.

Each refusal is counted in :data:`REGISTRY` (``protogalaxy_http_refused_total``
by reason), which the services' ``/metrics`` include.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any

import h11
from prometheus_client import CollectorRegistry, Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["REGISTRY", "ServerLimits", "guarded_protocol"]

_log = logging.getLogger("protogalaxy.http")

REGISTRY = CollectorRegistry()
REFUSED = Counter(
    "protogalaxy_http_refused_total",
    "Connections refused or closed by the server's own limits, by reason",
    ["reason"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class ServerLimits:
    max_per_peer: int = 64
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_per_peer < 1:
            raise ValueError("max_per_peer must be >= 1")
        if self.header_timeout_s <= 0 or self.body_idle_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


def _refusal(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"error": reason, "detail": detail}).encode()
    phrase = {503: "Service Unavailable", 408: "Request Timeout"}[status]
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _count(reason: str, peer: str) -> None:
    REFUSED.labels(reason=reason).inc()
    _log.warning(
        "connection_refused",
        extra={
            "event_record": {
                "event": "connection_refused",
                "reason": reason,
                "peer": peer,
            }
        },
    )


def guarded_protocol(limits: ServerLimits) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.run(http=...)`` with ``limits``."""
    open_per_peer: Tally[str] = Tally()

    class Guarded(H11Protocol):
        _peer: str | None = None
        _timer: asyncio.TimerHandle | None = None
        _body_at = 0.0  # when the last piece of a body arrived

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = self.client[0] if self.client else "?"
            if open_per_peer[peer] >= limits.max_per_peer:
                _count("too_many_connections", peer)
                transport.write(
                    _refusal(
                        503,
                        "too_many_connections",
                        f"{limits.max_per_peer} connections from {peer} are open",
                    )
                )
                transport.close()
                return
            self._peer = peer
            open_per_peer[peer] += 1
            self._arm(limits.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._peer is not None:
                open_per_peer[self._peer] -= 1
                if open_per_peer[self._peer] <= 0:
                    del open_per_peer[self._peer]
                self._peer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                # Idle time between pieces: note the time (a body comes in
                # hundreds of pieces: no timer per piece); the timer looks at it.
                self._body_at = self.loop.time()
                if self._timer is None or self._timer_for != "body":
                    self._arm(limits.body_idle_timeout_s, "body")
            elif state is not h11.IDLE:
                self._disarm()  # the request is in: the wait is ours now
            # IDLE: headers still arriving; their timer keeps running (a total,
            # not an idle time, or a byte every few seconds would hold it open)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._peer is not None:
                self._arm(limits.header_timeout_s)  # for the next request

        _timer_for = ""

        def _arm(self, seconds: float, what: str = "headers") -> None:
            self._disarm()
            self._timer_for = what
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._timer_for == "body":
                idle = self.loop.time() - self._body_at
                if self.flow is not None and self.flow.read_paused:
                    # We stopped reading (the handler is behind): not the peer's
                    # stall. Wait a whole period again.
                    self._body_at = self.loop.time()
                    idle = 0.0
                if idle < limits.body_idle_timeout_s:  # a piece came meanwhile
                    self._arm(limits.body_idle_timeout_s - idle, "body")
                    return
            if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
                return
            if (
                state is h11.IDLE
                and self.cycle is not None
                and (not self.cycle.response_complete)
            ):
                return  # a response is still being sent
            reason = "body_timeout" if state is h11.SEND_BODY else "header_timeout"
            _count(reason, self._peer or "?")
            if state is h11.IDLE and not self.conn.trailing_data[0]:
                # Nothing of a request arrived: an idle connection, closed
                # without a word (as a keep-alive timeout would).
                self.transport.close()
                return
            if state is h11.IDLE:
                self.transport.write(
                    _refusal(408, reason, "the request headers took too long")
                )
            self.transport.close()

    Guarded.__name__ = "GuardedH11Protocol"
    return Guarded

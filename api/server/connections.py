"""The HTTP server under the app: connection limits, header deadlines and parser errors.

aiohttp answers what happens before a request reaches the app (its request parser, idle
connections) on its own: a text/plain 400 that echoes the malformed input, a traceback per
bad request in the log, no deadline on a request's headers, and no bound on connections. Its
one public hook for that is none, so this module leans on aiohttp's internals
(web_protocol.RequestHandler and its log_access, web_server.Server, AppRunner._make_server),
as hot_path.py beside it does; nothing outside this package does. The aiohttp minor version
is pinned in pyproject.toml and tests/test_api_server.py checks every assumption made here,
so an upgrade fails loudly instead of quietly losing the limits.

What the server adds, per API process:
- a response's body (and the request's) is let go once it is written, not kept until the
  connection's next request;
- every error aiohttp answers itself gets the JSON envelope and an X-Request-Id, and logs one
  line (not a traceback), at most one per kind every 10 s (engine.throttle);
- a request's headers must arrive within API_HEADER_TIMEOUT of the connection (or of the
  request's first byte on a kept-alive connection), else 408 and close (checked by one sweep
  per server, every quarter of the timeout: a timer per request cost ~2 µs of a ~60 µs read);
- at most `max_connections` open connections (lowered to fit the open-file limit): at the
  limit the oldest connection with no request in progress (idle, or still sending headers)
  is closed to make room, so slow clients cannot lock out a health probe; when every
  connection has a request in progress the newcomer gets 503 and is closed.
Request bodies are read by api.validation under API_BODY_TIMEOUT, and decompressed there
(auto_decompress is off, so that a body's size is bounded after decompression too).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from api.access_log import ACCESS_LOGGER, access_logger_class
from api.front_door import AppHandler, FrontDoor
from api.hot_read import HotReads
from api.responses import error_response, json_body_bytes
from api.server.hot_path import HotPathHandler
from api.server.limits import ServerLimits, connection_cap
from engine.settings import Settings
from engine.throttle import LogThrottle

log = logging.getLogger("api.server")

REQUEST_ID_HEADER: Final = "X-Request-Id"
# Idle keep-alive connections are closed after this long (seconds): above the 60 s idle
# timeout of common load balancers, so that they, not we, close idle connections first.
KEEPALIVE_S: Final = 75.0
# The header deadline is enforced by a sweep every quarter of API_HEADER_TIMEOUT (at most
# that much late), but not more often than every 50 ms.
SWEEP_SHARE: Final = 0.25
MIN_SWEEP_S: Final = 0.05

# Client-facing text for the parser's complaints, by exception class name; the input the
# parser quotes (and its position in it) goes to the log only.
_PARSER_MESSAGES: Final = {
    "LineTooLong": "Request line or header field too long",
    "BadHttpMethod": "Unknown HTTP method",
    "InvalidURLError": "Malformed request target",
    "TransferEncodingError": "Malformed chunked body",
    "ContentLengthError": "Body shorter than its Content-Length",
}
_STATUS_CODES: Final = {
    400: "BAD_REQUEST",
    408: "REQUEST_TIMEOUT",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}


def raw_error(status: int, code: str, message: str, request_id: str) -> bytes:
    """A complete HTTP/1.1 error response with the envelope, for a connection with no request."""
    body = json_body_bytes(code, message)
    head = (
        f"HTTP/1.1 {status} {_phrase(status)}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _brief(exc: BaseException | None) -> str:
    """One log-safe line about a parser error: its class and the start of its message."""
    if exc is None:
        return "no detail"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]!r}"


class EnvelopeHandler(HotPathHandler):
    """aiohttp's connection protocol (with the hot reads taken off its loop: hot_path.py),
    a header deadline and enveloped error answers."""

    __slots__ = ("_envelope_server", "_head_due", "_requests_at_arm")

    def __init__(self, manager: EnvelopeServer, **kwargs: Any) -> None:
        super().__init__(manager, hot_reads=manager.hot_reads, **kwargs)
        self._envelope_server = manager
        # Loop time by which the pending request head must be complete (None: nothing
        # pending); the server's sweep enforces it.
        self._head_due: float | None = None
        self._requests_at_arm = 0

    @property
    def idle(self) -> bool:
        """No request in progress: waiting for a request, or for the rest of its headers."""
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and not self._request_in_progress
            and not self._hot_busy
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()
        self._envelope_server.admit(self)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._head_due = None  # a whole request head arrived
        elif self._head_due is None and data and self.idle:
            self._arm_header_deadline()  # the first bytes of the next request

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_due = None
        self._envelope_server.forget(self)
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._requests_at_arm = self._request_count
        self._head_due = self._loop.time() + self._envelope_server.limits.header_timeout_s

    def head_overdue(self, now: float) -> bool:
        """Whether a request head is late by `now` (loop time); called by the server's sweep."""
        due = self._head_due
        if due is None or due > now:
            return False
        self._head_due = None
        if self._request_count != self._requests_at_arm or self.transport is None:
            return False
        return not self._request_in_progress and not self._hot_busy

    def header_deadline_passed(self) -> None:
        """Answer 408 and close: the request head did not arrive in time."""
        self._envelope_server.throttle.warning(
            "header-timeout",
            "closed a connection from %s: no complete request head within %.1f s",
            self._peer(),
            self._envelope_server.limits.header_timeout_s,
        )
        self.shed(408, "REQUEST_TIMEOUT", "Request headers not received in time")

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """aiohttp's (the access logger), then let go of the bodies, now on the wire.

        aiohttp calls this once a response is written, and its connection loop keeps the
        last request and response referenced while a kept-alive connection waits for its
        next request: a 53 KB timeline per idle connection, for as long as the client keeps
        it open. (A plain method: overriding the coroutine finish_response cost a frame.)
        """
        super().log_access(request, response, time)
        if isinstance(response, web.Response):
            response.body = None
        request._read_bytes = None

    def shed(self, status: int, code: str, message: str) -> None:
        """Answer a connection that has no request being handled with an error, and close it."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(raw_error(status, code, message, secrets.token_hex(8)))
        self.force_close()

    def _peer(self) -> str:
        """host:port of the peer, for log lines ("?" once the connection is gone)."""
        peer = self._peername()
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The envelope, with a request id, for what aiohttp answers itself; one log line."""
        if request.writer.output_size > 0:
            # As aiohttp does: a response already started cannot be replaced.
            raise ConnectionError("response already started; cannot send an error response")
        request_id = secrets.token_hex(8)
        code = _STATUS_CODES.get(status, "HTTP_ERROR")
        if status == 400:
            text = _PARSER_MESSAGES.get(type(exc).__name__, "Malformed HTTP request")
            self._envelope_server.throttle.warning(
                "malformed",
                "malformed request %s from %s: %s",
                request_id,
                self._peer(),
                _brief(exc),
            )
        else:
            text = _phrase(status)
            self._envelope_server.throttle.warning(
                f"status-{status}",
                "request %s from %s failed before the app answered: %s",
                request_id,
                self._peer(),
                _brief(exc),
            )
        response = error_response(status, code, text)
        response.headers[REQUEST_ID_HEADER] = request_id
        response.force_close()
        return response


class EnvelopeServer(web.Server):
    """aiohttp's Server, making EnvelopeHandlers and keeping count of open connections."""

    def __init__(
        self, *args: Any, limits: ServerLimits, hot_reads: HotReads | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.hot_reads = hot_reads
        self.throttle = LogThrottle(log)
        # Open connections, oldest first (dicts keep insertion order).
        self._open: dict[EnvelopeHandler, None] = {}
        # One timer per server, not one per request: every SWEEP_SHARE of the header
        # timeout, while connections are open, the late request heads are answered 408.
        self._sweep_every = max(MIN_SWEEP_S, limits.header_timeout_s * SWEEP_SHARE)
        self._sweep: asyncio.TimerHandle | None = None

    def _schedule_sweep(self) -> None:
        if self._sweep is None and self._open:
            self._sweep = self._loop.call_later(self._sweep_every, self._sweep_heads)

    def _sweep_heads(self) -> None:
        self._sweep = None
        now = self._loop.time()
        for handler in [h for h in self._open if h.head_overdue(now)]:
            handler.header_deadline_passed()
        self._schedule_sweep()

    def __call__(self) -> EnvelopeHandler:
        return EnvelopeHandler(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet lost."""
        return len(self._open)

    def admit(self, handler: EnvelopeHandler) -> None:
        """Count a new connection; over the limit, make room or turn the newcomer away."""
        self._open[handler] = None
        self._schedule_sweep()
        if len(self._open) <= self.limits.max_connections:
            return
        for other in self._open:
            if other is not handler and other.idle:
                self.throttle.warning(
                    "connection-limit",
                    "connection limit (%d) reached: closed the oldest idle connection",
                    self.limits.max_connections,
                )
                self.forget(other)
                other.force_close()
                return
        self.throttle.warning(
            "connection-limit-busy",
            "connection limit (%d) reached with every connection busy: refused one",
            self.limits.max_connections,
        )
        self.forget(handler)
        handler.shed(503, "SERVICE_UNAVAILABLE", "Too many connections")

    def forget(self, handler: EnvelopeHandler) -> None:
        """Stop counting a connection (lost, or closed by us)."""
        self._open.pop(handler, None)

    async def shutdown(self, timeout: float | None = None) -> None:
        """aiohttp's, then no more sweeps."""
        await super().shutdown(timeout)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


class EnvelopeRunner(web.AppRunner):
    """An AppRunner whose server is an EnvelopeServer."""

    def __init__(
        self,
        app: web.Application,
        limits: ServerLimits,
        front: Callable[[AppHandler], AppHandler] | None = None,
        hot_reads: HotReads | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self._front = front
        self._hot_reads = hot_reads

    async def _make_server(self) -> web.Server:
        # The app's startup runs here; its Server tells us the handler and kwargs it chose.
        base = await super()._make_server()
        handler = base.request_handler
        return EnvelopeServer(
            handler if self._front is None else self._front(handler),
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            limits=self.limits,
            hot_reads=self._hot_reads,
            **base._kwargs,
        )


def make_runner(
    app: web.Application, settings: Settings, *, front_door: bool = True
) -> EnvelopeRunner:
    """The runner every API process (and the tests) serves `app` with; `front_door=False`
    routes every request through the app (tests compare the two)."""
    limits = ServerLimits(
        header_timeout_s=settings.api_header_timeout_ms / 1000,
        max_connections=connection_cap(settings.api_max_connections),
    )
    return EnvelopeRunner(
        app,
        limits,
        # GET /api/cache/{userId} before the router and middleware chain (api/front_door.py).
        front=partial(FrontDoor, app) if front_door else None,
        # ... and, of those, the plain cached reads answered off aiohttp's loop (hot_read.py).
        hot_reads=HotReads(app, settings.access_log_sample) if front_door else None,
        # aiohttp's public hook, called once a response is written (api/access_log.py): the
        # HTTP metrics always, and the access log line as ACCESS_LOG says.
        access_log_class=access_logger_class(settings.access_log_sample),
        access_log=ACCESS_LOGGER,
        handle_signals=False,
        keepalive_timeout=KEEPALIVE_S,
        auto_decompress=False,
    )

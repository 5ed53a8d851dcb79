"""The middleware: a request id on every response (and log line), every failure as the error
envelope; and, only while tracing is on, a server span around each request.

The envelope is one middleware rather than two because each costs a coroutine frame per
request, and the error path must set the request id too. For the same reason the tracing
middleware is in the app only when tracing is (api.app.create_app). The request id is also
the `request_id` of every line logged while the request is served (engine.logs).

Errors raised on purpose (`PrefetchError`) carry their status and code; a client sees their
`public_message`, never a host, port or parser detail, and a dependency failure (5xx) is
logged in one line with the request id and those details (rate-limited per code: an outage
fails many requests alike). aiohttp's own HTTP errors (unknown route, wrong method, body too
large) are mapped to the contract's codes; anything else is logged with the request id and its
traceback, and answered 500 without internals. What aiohttp answers before a request reaches
the app (malformed HTTP) is api.server's business.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from random import getrandbits
from typing import TypeVar

from aiohttp import web

from api.access_log import route_of
from api.appkeys import ERROR_LOG, REQUEST_ID, REQUEST_STARTED
from api.responses import error_response
from engine import logs, tracing
from engine.errors import PrefetchError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A request of either kind: routed (web.Request), or taken by the front door before routing.
R = TypeVar("R", bound=web.BaseRequest)

REQUEST_ID_HEADER = "X-Request-Id"
# An incoming id is echoed only if it is short and harmless in logs and headers.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}", re.ASCII)

_HTTP_CODES = {
    400: ("BAD_REQUEST", "Bad request"),
    404: ("NOT_FOUND", "Route not found"),
    405: ("METHOD_NOT_ALLOWED", "Method not allowed"),
    413: ("PAYLOAD_TOO_LARGE", "Request body is larger than 64 KB"),
}


def request_id_of(request: web.BaseRequest) -> str:
    """The caller's X-Request-Id when sane, else a new short random one (`request_id_from`)."""
    return request_id_from(request.headers)


def request_id_from(headers: Mapping[str, str]) -> str:
    """The X-Request-Id of these request headers when sane, else a new short random one.

    A request id names a request in logs; it guards nothing, so it comes from the process's
    PRNG (reseeded in each forked child by `random`'s own fork hook), not from os.urandom: a
    system call per request saved.
    """
    incoming = headers.get(REQUEST_ID_HEADER)
    if incoming is not None and _SANE_ID.fullmatch(incoming):
        return incoming
    return f"{getrandbits(64):016x}"


def _http_error(exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:  # redirects and the like pass through untouched
        return exc
    code, message = _HTTP_CODES.get(exc.status, ("HTTP_ERROR", exc.reason))
    response = error_response(exc.status, code, message)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
    return response


def _prefetch_error(
    exc: PrefetchError, request_id: str, request: web.BaseRequest, app: web.Application
) -> web.Response:
    if exc.status >= 500 and exc.code == "INTERNAL_ERROR":
        # An unexpected failure that happens to be one of ours (a Redis error reply, ...).
        log.error("request %s %s %s failed", request_id, request.method, request.path, exc_info=exc)
        return error_response(500, "INTERNAL_ERROR", "Internal server error")
    if exc.status >= 500:
        # A dependency failed: expected in an outage, so one line (per code and interval),
        # with what the client is not told.
        app[ERROR_LOG].warning(
            exc.code,
            "request %s %s %s: %s %s",
            request_id,
            request.method,
            request.path,
            exc.code,
            exc.message,
        )
    return error_response(exc.status, exc.code, exc.public_message)


async def envelope(
    request: R, app: web.Application, handler: Callable[[R], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """`handler`'s answer to `request`, tagged with X-Request-Id; exceptions as envelopes.

    The envelope middleware's body, called directly by api.front_door for the hot route
    (`app` is passed in: a request that skipped the router has no `request.app`).
    """
    request[REQUEST_STARTED] = time.perf_counter()
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    token = logs.REQUEST_ID.set(request_id)
    response: web.StreamResponse
    try:
        response = await handler(request)
    except PrefetchError as exc:
        response = _prefetch_error(exc, request_id, request, app)
    except web.HTTPException as exc:
        response = _http_error(exc)
    except Exception:
        log.exception("request %s %s %s failed", request_id, request.method, request.path)
        response = error_response(500, "INTERNAL_ERROR", "Internal server error")
    finally:
        # The connection's task serves its next request with this context: no stale id.
        logs.REQUEST_ID.reset(token)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tag the response with X-Request-Id; turn exceptions into error envelopes."""
    return await envelope(request, request.app, handler)


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span around the request (outermost: it sees the enveloped answer), continuing
    the caller's `traceparent`."""
    if tracing.tracer is None:
        return await handler(request)
    route = route_of(request)
    attributes = {
        "http.request.method": request.method,
        "http.route": route,
        "url.path": request.path,
    }
    parent = tracing.extract(request.headers)
    with tracing.span(f"{request.method} {route}", "server", attributes, parent) as span:
        response = await handler(request)
        if span is not None:
            span.set_attribute("http.response.status_code", response.status)
            request_id = response.headers.get(REQUEST_ID_HEADER)
            if request_id is not None:
                span.set_attribute("prefetch.request_id", request_id)
            if response.status >= 500:
                from opentelemetry.trace import StatusCode

                span.set_status(StatusCode.ERROR)
        return response

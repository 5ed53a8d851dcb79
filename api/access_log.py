"""One access log line and the HTTP metrics per answered request.

aiohttp calls an access logger once a response has been written (its public hook,
`AbstractAccessLogger`), for the app's answers and for those api.server makes itself
(malformed HTTP): so each line knows the bytes written and the whole duration. The same call
counts the request in `prefetch_http_requests_total{route,method,status}` and
`prefetch_http_request_duration_seconds{route,cache}` (`cache` is hit or miss for a timeline
read, so that a cached read's p99 stands apart from read-throughs; none elsewhere), whatever
the access log setting (tallied in memory, published once a second: api/http_metrics.py).

`route` is the route's template (`/api/cache/{userId}`), never the raw path, so that the
metrics' label sets stay few: a path that matched no route is `unmatched`, a request the
parser refused is `-`. ACCESS_LOG (Settings.access_log_sample) keeps every line (on), none
(off) or a random share of them (`sample:0.01`); a 5xx is always logged. The line is INFO on
the `access` logger: `GET /api/cache/<id> 200`, with method, route, path, status,
duration_ms, bytes, remote and request_id as fields, written by engine.logs.emit_fields
without the logging module's record and handler machinery (the same line at about a quarter
of the cost: tuning.md).
"""

from __future__ import annotations

import logging
import random
import time as clock
from collections.abc import Callable
from typing import ClassVar, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from api import http_metrics
from api.appkeys import READ_RESULT, REQUEST_STARTED, ROUTE
from engine import logs

ACCESS_LOGGER: Final = logging.getLogger("access")
REQUEST_ID_HEADER: Final = "X-Request-Id"
UNMATCHED: Final = "unmatched"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(request: web.BaseRequest) -> str:
    """The template of the route that served `request`; `unmatched`, or `-` before routing."""
    route: str | None = request.get(ROUTE)  # set by api.front_door, before the router
    if route is not None:
        return route
    try:
        match_info = request.match_info  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):  # a BaseRequest has none; an unrouted one asserts
        return "-"
    if match_info is None:
        return "-"
    resource = match_info.route.resource
    return UNMATCHED if resource is None else str(resource.canonical)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access logger hook: the metrics, then (sampled) the line."""

    sample: ClassVar[float] = 1.0

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Called by aiohttp once `response` is written; `time` is the request's duration (s)
        by the loop's clock, replaced by the app's own measure when the app saw the request."""
        started = request.get(REQUEST_STARTED)
        if started is not None:
            time = clock.perf_counter() - started
        method = request.method if request.method in METHODS else "OTHER"
        size = response.content_length
        record(
            self.logger,
            self.sample,
            method,
            route_of(request),
            request.path,
            response.status,
            time,
            request.get(READ_RESULT, "none"),
            size if size is not None else response.body_length,
            lambda: request.remote,
            response.headers.get(REQUEST_ID_HEADER),
        )


def record(
    logger: logging.Logger,
    sample: float,
    method: str,
    route: str,
    path: str,
    status: int,
    seconds: float,
    cache: str,
    size: int,
    remote: Callable[[], str | None],
    request_id: str | None,
) -> None:
    """Count one answered request in the HTTP metrics, and log its line (`sample` of them;
    every 5xx). `remote` is asked only when the line is written."""
    http_metrics.observe(route, method, status, seconds, cache)
    if sample < 1.0 and status < 500 and (sample <= 0.0 or random.random() >= sample):
        return
    if not logger.isEnabledFor(logging.INFO):
        return
    # The fields of the line, in order; engine.logs writes it without a LogRecord.
    logs.emit_fields(
        logger,
        logging.INFO,
        f"{method} {path} {status}",
        {
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes": size,
            "remote": remote(),
            "request_id": request_id,
        },
    )


def access_logger_class(sample: float) -> type[AccessLogger]:
    """An AccessLogger class that keeps `sample` of the lines (1: all, 0: none)."""
    return type("SampledAccessLogger", (AccessLogger,), {"sample": sample, "__slots__": ()})

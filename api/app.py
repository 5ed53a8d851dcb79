"""The app factory: `create_app(settings)` wires routes, the middleware and the lifespan.

Each per-process resource has its own cleanup context, so a resource is torn down only if
it was set up, in reverse order: the Runtime (Redis connections, the HTTP session, the stats
flusher) first, then the activity batcher that writes through the Runtime's Redis.
Serving it is api.server.make_runner's business (limits, parser errors, the access log).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web

from api import contract, http_metrics, views_cache, views_health, views_prefetch
from api.activity import ActivityBatcher
from api.appkeys import (
    ACTIVITY,
    AUTH,
    CACHE_COUNTS,
    ERROR_LOG,
    RUNTIME,
    SCRAPER,
    SETTINGS,
    STARTED_AT,
)
from api.auth import Authenticator
from api.memo import Memo
from api.middlewares import envelope_middleware, tracing_middleware
from api.middlewares import log as middleware_log
from api.validation import MAX_BODY_BYTES
from engine import tracing
from engine.metrics.scrape import Scraper
from engine.runtime import open_runtime
from engine.settings import Settings
from engine.throttle import LogThrottle


def setup_runtime(app: web.Application) -> None:
    """The process's Runtime, the token validator that uses its CA client, and /metrics."""

    async def runtime_context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        async with open_runtime(settings, local_cache=True) as runtime:
            app[RUNTIME] = runtime
            app[AUTH] = Authenticator(
                runtime.ca, settings.auth_cache_ttl_ms, settings.auth_cache_size
            )
            app[SCRAPER] = Scraper(
                settings.metrics_dir, runtime.jobs.stats, before=http_metrics.flush
            )
            yield

    app.cleanup_ctx.append(runtime_context)


def setup_activity(app: web.Application) -> None:
    """The activity batcher, flushing to the metrics DB once a second."""

    async def activity_context(app: web.Application) -> AsyncIterator[None]:
        batcher = ActivityBatcher(app[RUNTIME])
        batcher.start()
        app[ACTIVITY] = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app.cleanup_ctx.append(activity_context)


def setup_metrics(app: web.Application) -> None:
    """Publish the per-request metrics tallied in memory once a second (api/http_metrics)."""

    async def publish() -> None:
        while True:
            await asyncio.sleep(http_metrics.FLUSH_INTERVAL_S)
            http_metrics.flush()

    async def metrics_context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(publish(), name="http-metrics")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            http_metrics.flush()

    app.cleanup_ctx.append(metrics_context)


def setup_routes(app: web.Application) -> None:
    """Every route of the contract (api/openapi.yaml); within a module, more specific paths
    come first."""
    app.router.add_routes(views_cache.ROUTES)
    app.router.add_routes(views_prefetch.ROUTES)
    app.router.add_routes(views_health.ROUTES)
    app.router.add_routes(contract.ROUTES)


def create_app(settings: Settings) -> web.Application:
    """The API application for `settings`; resources open when the app starts."""
    middlewares = [envelope_middleware]
    if settings.otel_traces_exporter != "none" or tracing.tracer is not None:
        middlewares.insert(0, tracing_middleware)  # a frame per request: only when tracing
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[STARTED_AT] = time.monotonic()
    app[ERROR_LOG] = LogThrottle(middleware_log)
    app[CACHE_COUNTS] = Memo(views_health.CACHE_COUNTS_TTL_S)
    setup_runtime(app)
    setup_activity(app)
    setup_metrics(app)
    setup_routes(app)
    return app

"""The simulated timeline service: deterministic posts per user, served from encoded bytes."""

from __future__ import annotations

import asyncio
import random
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from engine.settings import Settings
from sandbox.ca import SandboxTokens
from sandbox.config import SandboxSettings
from sandbox.posts import MAX_LIMIT, generate_posts, timeline_body

__all__ = ["MAX_LIMIT", "generate_posts", "timeline_app", "timeline_body"]

DEFAULT_LIMIT = 20
MAX_CACHED_BODIES = 20_000
# 20,000 bodies of 100 posts would be ~1 GB; past this budget the oldest bodies are dropped.
MAX_CACHED_BYTES = 256 * 1024 * 1024
SLOW_SECONDS = 60.0

NOT_FOUND_PREFIX = "0000dead-"
UNAVAILABLE_PREFIX = "0000fa11-"
SLOW_PREFIX = "0000510e-"
MALFORMED_PREFIX = "0000bad0-"
MALFORMED_BODY = b'{"success": true, "posts": [ not json'


class _BodyCache:
    """Encoded bodies by (user, limit), oldest dropped past an entry or byte bound."""

    def __init__(
        self, max_entries: int = MAX_CACHED_BODIES, max_bytes: int = MAX_CACHED_BYTES
    ) -> None:
        self._bodies: dict[tuple[str, int], bytes] = {}
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    def get(self, user_id: str, limit: int) -> bytes:
        key = (user_id, limit)
        body = self._bodies.get(key)
        if body is None:
            body = timeline_body(user_id, limit)
            self._bodies[key] = body
            self._bytes += len(body)
            while len(self._bodies) > self._max_entries or self._bytes > self._max_bytes:
                oldest = next(iter(self._bodies))
                self._bytes -= len(self._bodies.pop(oldest))
        return body


def _error(status: int, code: str, message: str) -> web.Response:
    payload = {"success": False, "error": code, "message": message}
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _parse_limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 1 <= value <= MAX_LIMIT else None


def timeline_app(
    settings: Settings, sandbox: SandboxSettings, tokens: SandboxTokens
) -> web.Application:
    """The timeline application, on the path of TIMELINE_SERVICE_URL plus TIMELINE_PATH."""
    prefix = urlsplit(settings.timeline_url).path.rstrip("/")
    cache = _BodyCache()
    chance = random.Random()  # knob decisions are deliberately not reproducible
    fetches = 0
    by_user: dict[str, int] = {}
    # Requests being answered now, and the most at once since the last reset: how tests see
    # that a worker keeps to PREFETCH_JOB_CONCURRENCY.
    in_flight = peak_in_flight = 0
    delayed = sandbox.latency_ms > 0 or sandbox.jitter_ms > 0

    async def timeline_handler(request: web.Request) -> web.Response:
        nonlocal fetches, in_flight, peak_in_flight
        user_id = request.match_info["userId"]
        fetches += 1
        by_user[user_id] = by_user.get(user_id, 0) + 1
        in_flight += 1
        peak_in_flight = max(peak_in_flight, in_flight)
        try:
            return await answer(request, user_id)
        finally:
            in_flight -= 1

    async def answer(request: web.Request, user_id: str) -> web.Response:
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not tokens.service_token_ok(token.strip()):
                return _error(401, "INVALID_TOKEN", "Invalid or expired service token")
        limit = _parse_limit(request.query.get("limit"))
        if limit is None:
            return _error(400, "INVALID_LIMIT", f"limit must be an integer from 1 to {MAX_LIMIT}")
        if delayed:
            jitter = chance.uniform(0, sandbox.jitter_ms) if sandbox.jitter_ms else 0.0
            await asyncio.sleep((sandbox.latency_ms + jitter) / 1000)
        if user_id.startswith(NOT_FOUND_PREFIX):
            return _error(404, "USER_NOT_FOUND", "User not found")
        if user_id.startswith(UNAVAILABLE_PREFIX):
            return _error(503, "SERVICE_UNAVAILABLE", "Timeline service unavailable")
        if user_id.startswith(MALFORMED_PREFIX):
            return web.Response(body=MALFORMED_BODY, content_type="application/json")
        if user_id.startswith(SLOW_PREFIX):
            await asyncio.sleep(SLOW_SECONDS)
        elif sandbox.error_rate and chance.random() < sandbox.error_rate:
            return _error(503, "SERVICE_UNAVAILABLE", "Injected failure (SANDBOX_ERROR_RATE)")
        return web.Response(body=cache.get(user_id, limit), content_type="application/json")

    async def health_handler(request: web.Request) -> web.Response:
        return _json({"status": "healthy", "service": "sandbox-timeline"})

    async def stats_handler(request: web.Request) -> web.Response:
        return _json(
            {"timelineFetches": fetches, "byUser": by_user, "peakInFlight": peak_in_flight}
        )

    async def reset_handler(request: web.Request) -> web.Response:
        nonlocal fetches, peak_in_flight
        fetches = peak_in_flight = 0
        by_user.clear()
        return _json({"success": True})

    app = web.Application()
    app.router.add_get(prefix + settings.timeline_path, timeline_handler)
    app.router.add_get(prefix + "/health", health_handler)
    app.router.add_get(prefix + "/__stats", stats_handler)
    app.router.add_post(prefix + "/__reset", reset_handler)
    return app

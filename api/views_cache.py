"""Cache routes: the timeline read (the product's hot path), its status and invalidation.

GET /api/cache/{userId} serves the stored bytes as they are: the entry was encoded once, in
the response's exact shape, by whoever prefetched it. Nothing here parses or encodes JSON on
a hit; a gzip entry goes out compressed to clients that accept gzip.
"""

from __future__ import annotations

from functools import lru_cache

from aiohttp import web

from api import validation
from api.appkeys import ACTIVITY, AUTH, READ_RESULT, RUNTIME
from api.responses import JSON, success
from engine.errors import NotFound
from engine.metrics import prometheus
from engine.store.cache import GZIP_MAGIC, decompress

_GZIP_HEADERS = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
_VARY = {"Vary": "Accept-Encoding"}


@lru_cache(maxsize=256)
def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value admits gzip (`gzip;q=0` refuses it, `*` admits it).

    Clients send a handful of distinct values, so the parse is cached.
    """
    found: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        name, _, params = item.partition(";")
        name = name.strip()
        if name not in ("gzip", "x-gzip", "*"):
            continue
        quality = params.strip().removeprefix("q=").strip()
        try:
            found[name] = float(quality) if quality else 1.0
        except ValueError:
            found[name] = 0.0
    for name in ("gzip", "x-gzip", "*"):
        if name in found:
            return found[name] > 0
    return False


def _timeline_response(request: web.Request, stored: bytes) -> web.Response:
    """The stored entry as the response: gzip as is when accepted, else plain JSON."""
    if stored[:2] != GZIP_MAGIC:
        return web.Response(body=stored, content_type=JSON)
    if accepts_gzip(request.headers.get("Accept-Encoding", "")):
        return web.Response(body=stored, content_type=JSON, headers=_GZIP_HEADERS)
    return web.Response(body=decompress(stored), content_type=JSON, headers=_VARY)


async def get_timeline(request: web.Request) -> web.Response:
    """GET /api/cache/{userId}: hot, then warm, then one shared upstream fetch (read-through)."""
    user = validation.user_id(request.match_info["userId"])
    app = request.app
    await app[AUTH].authorize(request.headers.get("Authorization"), "read", user)
    runtime = app[RUNTIME]
    found = await runtime.cache.read(user)
    if found is not None:
        tier, stored = found
        runtime.stats.hit(tier)
        (prometheus.HOT_HIT if tier == "hot" else prometheus.WARM_HIT).inc()
        request[READ_RESULT] = "hit"
        app[ACTIVITY].add(user, tier)
        return _timeline_response(request, stored)
    runtime.stats.miss()
    prometheus.CACHE_MISSES.inc()
    request[READ_RESULT] = "miss"
    if request.query.get("cacheOnly") == "true":
        raise NotFound("Timeline not cached")
    # Plain JSON with meta.cached false; upstream failures carry their status and code.
    body = await runtime.prefetcher.read_through(user)
    app[ACTIVITY].add(user)
    return web.Response(body=body, content_type=JSON)


async def get_status(request: web.Request) -> web.Response:
    """GET /api/cache/status/{userId}: which tier would serve the user, and for how long."""
    user = validation.user_id(request.match_info["userId"])
    await request.app[AUTH].authorize(request.headers.get("Authorization"), "read", user)
    found = await request.app[RUNTIME].cache.status(user)
    if found is None:
        return success({"cached": False, "tier": None, "ttl": None, "expiresIn": None})
    tier, remaining_ms = found
    # Rounded to the nearest second, as Redis's own TTL does.
    ttl = (remaining_ms + 500) // 1000
    return success({"cached": True, "tier": tier, "ttl": ttl, "expiresIn": remaining_ms})


async def invalidate(request: web.Request) -> web.Response:
    """DELETE /api/cache/{userId}/timeline: both tiers; fetches in flight cannot write back."""
    user = validation.user_id(request.match_info["userId"])
    await request.app[AUTH].authorize(request.headers.get("Authorization"), "delete", user)
    await request.app[RUNTIME].cache.invalidate(user)
    return success({"userId": user}, message="Cache invalidated")


# The status route comes first: it is the more specific of the two GET paths.
ROUTES = [
    web.get("/api/cache/status/{userId}", get_status),
    web.get("/api/cache/{userId}", get_timeline),
    web.delete("/api/cache/{userId}/timeline", invalidate),
]

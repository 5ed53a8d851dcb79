"""Cache routes: the timeline read (the product's hot path), its status and invalidation.

GET /api/cache/{userId} serves the stored bytes as they are: the entry was encoded once, in
the response's exact shape, by whoever prefetched it. Nothing here parses or encodes JSON on
a hit; a gzip entry goes out compressed to clients that accept gzip.

Conditional reads: every entry carries the entity tag and expiry it was stamped with when
encoded (engine.store.entry.Stamp), so the answer has a strong ETag and `Cache-Control:
private, max-age=<seconds left>` at the cost of two slices, and `If-None-Match` with the
current tag gets 304 without a body. Each representation has its own tag (RFC 9110 8.8.3):
`"<tag>"` for the plain JSON, `"<tag>-gzip"` for the gzip coding, `"<tag>-rt"` for the
read-through answer (`meta.cached: false`); If-None-Match matches on `<tag>`, whichever
representation the client holds (as Apache's mod_deflate does), since all three carry the
same timeline.
"""

from __future__ import annotations

import time
from functools import lru_cache

from aiohttp import web

from api import http_metrics, validation
from api.appkeys import ACTIVITY, AUTH, READ_RESULT, RUNTIME
from api.raw_response import RawResponse, header_lines
from api.responses import JSON, success
from engine.errors import NotFound
from engine.prefetcher import ReadThrough
from engine.store.entry import GZIP_EXPIRES, GZIP_MAGIC, GZIP_TAG, Stamp, decompress, unstamp

_GZIP_HEADERS = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
_VARY = {"Vary": "Accept-Encoding"}
# The hot answer's last header lines (after ETag and Cache-Control).
_GZIP_TAIL = (
    b"\r\nVary: Accept-Encoding\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n"
)
# Untagged entries (stored before stamps existed, or not kept): revalidate every time.
_UNKNOWN_FRESHNESS = "private, max-age=0"


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


def matches(if_none_match: str, tag: str) -> bool:
    """Whether an If-None-Match value names entity tag `tag` (any representation's suffix,
    weak or strong, as RFC 9110 13.1.2 compares them) or is `*`."""
    for item in if_none_match.split(","):
        opaque = item.strip().removeprefix("W/").strip('"')
        if opaque == "*" or opaque.partition("-")[0] == tag:
            return True
    return False


def cache_control(expires_at: int) -> str:
    """`private, max-age=<whole seconds until expires_at>` (epoch ms; 0: unknown)."""
    if not expires_at:
        return _UNKNOWN_FRESHNESS
    return f"private, max-age={max(0, (expires_at - int(time.time() * 1000)) // 1000)}"


def _timeline_response(request: web.BaseRequest, stored: bytes) -> web.StreamResponse:
    """The stored entry as the response: gzip as is when accepted, else plain JSON; 304
    when the client's If-None-Match names the entry's tag."""
    request_headers = request.headers
    gzip_ok = accepts_gzip(request_headers.get("Accept-Encoding", ""))
    wanted = request_headers.get("If-None-Match")
    if wanted is not None:
        entry = unstamp(stored)
        if entry.tag is not None and matches(wanted, entry.tag):
            suffix = "-gzip" if entry.gzip and gzip_ok else ""
            return web.Response(status=304, headers=_validators(entry, suffix))
    body, lines = timeline_answer(stored, gzip_ok)
    return RawResponse(body, lines)


def timeline_answer(stored: bytes, gzip_ok: bool) -> tuple[bytes | memoryview, bytes]:
    """The 200 answer to a read of `stored` (body, header lines): the gzip member as is for
    a client that takes gzip (`gzip_ok`), else the plain JSON."""
    if gzip_ok and stored[3:4] == b"\x08" and stored[:2] == GZIP_MAGIC:
        # The hot path (a stamped gzip entry, a gzip client), without building a Stamp.
        lines = b"".join(
            (
                b'ETag: "',
                stored[GZIP_TAG],
                b'-gzip"\r\nCache-Control: ',
                cache_control(int(stored[GZIP_EXPIRES])).encode(),
                _GZIP_TAIL,
            )
        )
        return stored, lines
    entry = unstamp(stored)
    gzip = entry.gzip and gzip_ok
    if entry.tag is None:
        headers = dict(_GZIP_HEADERS if gzip else _VARY)
        headers["Cache-Control"] = _UNKNOWN_FRESHNESS
    else:
        headers = _validators(entry, "-gzip" if gzip else "")
        if gzip:
            headers.update(_GZIP_HEADERS)
    headers["Content-Type"] = JSON
    if gzip:
        return entry.payload, header_lines(headers)
    return (decompress(stored) if entry.gzip else entry.payload), header_lines(headers)


def _validators(entry: Stamp, suffix: str) -> dict[str, str]:
    return {
        "ETag": f'"{entry.tag}{suffix}"',
        "Cache-Control": cache_control(entry.expires_at),
        "Vary": "Accept-Encoding",
    }


def count_hit(app: web.Application, user: str, tier: str) -> None:
    """Count a read served from `tier`: the hit statistics, the HTTP metrics (tallied,
    published once a second) and the activity batch, which also learns the tier."""
    app[RUNTIME].stats.hit(tier)
    http_metrics.cache_hit(tier)
    app[ACTIVITY].add(user, tier)


def _read_through_response(fetched: ReadThrough) -> web.Response:
    """The read-through's plain JSON, with the validators of the entry stored from it."""
    headers = {"Cache-Control": cache_control(fetched.expires_at)}
    if fetched.tag is not None:
        headers["ETag"] = f'"{fetched.tag}-rt"'
    return web.Response(body=fetched.body, content_type=JSON, headers=headers)


async def get_timeline(request: web.Request) -> web.StreamResponse:
    """GET /api/cache/{userId}, through the router (api.front_door takes it first)."""
    return await read_timeline(request, request.app, request.match_info["userId"])


async def read_timeline(
    request: web.BaseRequest, app: web.Application, raw_user: str
) -> web.StreamResponse:
    """The timeline read: hot, then warm, then one shared upstream fetch (read-through).

    `app` comes in explicitly: api.front_door calls this for requests that skipped the router.
    """
    user = validation.user_id(raw_user)
    await app[AUTH].authorize(request.headers.get("Authorization"), "read", user)
    runtime = app[RUNTIME]
    found = await runtime.cache.read(user)
    if found is not None:
        tier, stored = found
        count_hit(app, user, tier)
        request[READ_RESULT] = "hit"
        return _timeline_response(request, stored)
    runtime.stats.miss()
    http_metrics.cache_miss()
    request[READ_RESULT] = "miss"
    if request.query.get("cacheOnly") == "true":
        raise NotFound("Timeline not cached")
    # Plain JSON with meta.cached false; upstream failures carry their status and code.
    fetched = await runtime.prefetcher.read_through(user)
    app[ACTIVITY].add(user)
    return _read_through_response(fetched)


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


TIMELINE_ROUTE = "/api/cache/{userId}"
# The status route comes first: it is the more specific of the two GET paths.
ROUTES = [
    web.get("/api/cache/status/{userId}", get_status),
    web.get(TIMELINE_ROUTE, get_timeline),
    web.delete("/api/cache/{userId}/timeline", invalidate),
]

"""Health checks (the seed's /health family) and the Prometheus endpoint. No auth here.

/health runs its checks concurrently, each bounded by CHECK_TIMEOUT_S, so one slow
dependency shows up as such instead of hiding the others. Redis down, or refusing even reads
(LOADING after a restart, BUSY running a script), makes the service unhealthy (503): it
cannot serve a read. Redis refusing writes only (OOM under noeviction, a read-only replica;
found by writing a probe key) makes it degraded (200), like a queue backlog, memory pressure
or an unreachable timeline service or CA: cached reads still work. /health/ready follows
the same line: 503 only when Redis does not serve reads.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from api.appkeys import CACHE_COUNTS, RUNTIME, SCRAPER, SETTINGS, STARTED_AT
from api.responses import iso_now, json_response
from engine.errors import PrefetchError, RedisRefused
from engine.store import keys
from engine.store.client import RedisClient
from engine.strategies.leader import leader_status
from engine.strategies.sidecar import scheduler_wanted

CHECK_TIMEOUT_S = 2.0
# /health/cache counts entries with SCAN; past this many steps it reports an estimate, and
# its answer is kept for CACHE_COUNTS_TTL_S (the endpoint is unauthenticated).
SCAN_MAX_STEPS = 100
SCAN_COUNT = 1000
CACHE_COUNTS_TTL_S = 5.0
PROBE_TTL_MS = 60_000
# Redis statuses that still serve reads.
SERVING = frozenset({"connected", "read-only"})

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


async def _bounded(check: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A check's result, or a timeout/error status; never raises."""
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except TimeoutError:
        return {"status": "timeout"}
    except RedisRefused as exc:
        return {"status": "refused", "error": exc.code, "reason": exc.kind}
    except PrefetchError as exc:
        return {"status": "disconnected", "error": exc.code}


def _info_field(info: bytes, name: str) -> str | None:
    prefix = name.encode() + b":"
    for line in info.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].decode().strip()
    return None


def _writable(reply: Any, result: dict[str, Any]) -> None:
    """Mark `result` read-only when the probe write was refused; raise other failures."""
    if isinstance(reply, RedisRefused):
        result["status"], result["reason"] = "read-only", reply.kind
    elif isinstance(reply, Exception):
        raise reply


async def _redis_check(client: RedisClient, db: int, *, memory: bool) -> dict[str, Any]:
    """PING latency, writability, key count (DBSIZE) and, for the hot tier, memory use."""
    started = time.perf_counter()
    await client.execute("PING")
    latency = f"{(time.perf_counter() - started) * 1000:.0f}ms"
    commands: list[tuple[str | int, ...]] = [
        ("SET", keys.HEALTH_PROBE, "1", "PX", PROBE_TTL_MS),
        ("DBSIZE",),
    ]
    if memory:
        commands.append(("INFO", "memory"))
    probe, *replies = await client.pipeline(commands)
    result: dict[str, Any] = {"status": "connected", "latency": latency}
    _writable(probe, result)
    if memory and isinstance(replies[1], bytes):
        human = _info_field(replies[1], "used_memory_human")
        # Redis writes "4.40M"; the seed's shape is "45.3MB".
        result["memory"] = f"{human}B" if human and human[-1] in "KMGT" else human
    # DBSIZE counts every key of the DB (generation marks too, and other roles' keys when
    # DBs are shared): an exact count per tier would need a SCAN, too costly for a probe.
    result["db"] = db
    result["keys"] = replies[0] if isinstance(replies[0], int) else None
    return result


def _rss_bytes() -> int:
    """Resident memory now (Linux /proc), else the peak that getrusage reports."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _memory_check(limit_mb: int) -> dict[str, Any]:
    """This process's RSS against HEALTH_MEMORY_LIMIT_MB."""
    rss_mb = _rss_bytes() / 1_048_576
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "status": "pressure" if rss_mb > limit_mb else "healthy",
        "rss": f"{rss_mb:.0f}MB",
        "peakRss": f"{peak_mb:.0f}MB",
        "limit": f"{limit_mb}MB",
    }


async def _queue_check(request: web.Request) -> dict[str, Any]:
    counts = await request.app[RUNTIME].jobs.stats()
    backlog = counts["waiting"] > request.app[SETTINGS].queue_backlog_degraded
    return {
        "status": "backlog" if backlog else "healthy",
        **{name: counts[name] for name in ("waiting", "active", "completed", "failed")},
    }


async def _scheduler_check(request: web.Request) -> dict[str, Any]:
    """Who leads the strategy scheduler and its last tick. Informational: an API process
    cannot tell whether a scheduler should run, so it never changes the overall status."""
    if not scheduler_wanted(request.app[SETTINGS]):
        return {"status": "disabled"}
    found = await leader_status(request.app[RUNTIME].redis["queue"])
    return {"status": "leading" if found["leader"] else "no-leader", **found}


async def _redis_checks(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    runtime, settings = request.app[RUNTIME], request.app[SETTINGS]
    hot, warm = await asyncio.gather(
        _bounded(_redis_check(runtime.redis["hot"], settings.db_hot, memory=True)),
        _bounded(_redis_check(runtime.redis["warm"], settings.db_warm, memory=False)),
    )
    return hot, warm


async def health(request: web.Request) -> web.Response:
    """GET /health: every check, and the overall status they add up to."""
    runtime = request.app[RUNTIME]
    (hot, warm), timeline, ca, memory, queue, scheduler = await asyncio.gather(
        _redis_checks(request),
        _bounded(runtime.timeline.health()),
        _bounded(runtime.ca.health()),
        _bounded(_memory_check(request.app[SETTINGS].health_memory_limit_mb)),
        _bounded(_queue_check(request)),
        _bounded(_scheduler_check(request)),
    )
    checks = {
        "hotCache": hot,
        "warmCache": warm,
        "timeline": timeline,
        "ca": ca,
        "memory": memory,
        "queue": queue,
        "scheduler": scheduler,
    }
    if any(check["status"] not in SERVING for check in (hot, warm)):
        status, code = "unhealthy", 503
    elif (
        hot["status"] != "connected"
        or warm["status"] != "connected"
        or queue["status"] != "healthy"
        or memory["status"] != "healthy"
        or timeline["status"] != "connected"
        or ca["status"] != "connected"
    ):
        status, code = "degraded", 200
    else:
        status, code = "healthy", 200
    body = {
        "service": "exprsn-prefetch",
        "status": status,
        "timestamp": iso_now(),
        "uptime": int(time.monotonic() - request.app[STARTED_AT]),
        "checks": checks,
    }
    return json_response(body, code)


def _redis_verdict(hot: dict[str, Any], warm: dict[str, Any]) -> tuple[str, int]:
    if hot["status"] not in SERVING or warm["status"] not in SERVING:
        return "unhealthy", 503
    if hot["status"] != "connected" or warm["status"] != "connected":
        return "degraded", 200
    return "healthy", 200


async def health_redis(request: web.Request) -> web.Response:
    """GET /health/redis: both cache tiers."""
    hot, warm = await _redis_checks(request)
    status, code = _redis_verdict(hot, warm)
    return json_response({"status": status, "hotCache": hot, "warmCache": warm}, code)


def _upstream_response(check: dict[str, Any]) -> web.Response:
    ok = check["status"] == "connected"
    return json_response({**check, "healthy": ok}, 200 if ok else 503)


async def health_timeline(request: web.Request) -> web.Response:
    """GET /health/timeline: the timeline service's /health."""
    return _upstream_response(await _bounded(request.app[RUNTIME].timeline.health()))


async def health_ca(request: web.Request) -> web.Response:
    """GET /health/ca: the CA's /health."""
    return _upstream_response(await _bounded(request.app[RUNTIME].ca.health()))


async def _count_entries(client: RedisClient, tier: str) -> dict[str, Any]:
    """Entries of one tier by SCAN, stopping (and saying so) after SCAN_MAX_STEPS steps."""
    cursor, count, steps = b"0", 0, 0
    while True:
        cursor, found = await client.execute(
            "SCAN", cursor, "MATCH", keys.timeline_pattern(tier), "COUNT", SCAN_COUNT
        )
        count += len(found)
        steps += 1
        if cursor == b"0" or steps >= SCAN_MAX_STEPS:
            return {"status": "connected", "entries": count, "exact": cursor == b"0"}


async def _cache_counts(request: web.Request) -> tuple[dict[str, Any], int]:
    runtime, settings = request.app[RUNTIME], request.app[SETTINGS]
    hot, warm = await asyncio.gather(
        _bounded(_count_entries(runtime.redis["hot"], "hot")),
        _bounded(_count_entries(runtime.redis["warm"], "warm")),
    )
    hot["db"], hot["ttlMs"] = settings.db_hot, settings.hot_ttl_ms
    warm["db"], warm["ttlMs"] = settings.db_warm, settings.warm_ttl_ms
    ok = hot["status"] == warm["status"] == "connected"
    body = {"status": "healthy" if ok else "unhealthy", "hot": hot, "warm": warm}
    return body, 200 if ok else 503


async def health_cache(request: web.Request) -> web.Response:
    """GET /health/cache: how many timelines each tier holds (kept CACHE_COUNTS_TTL_S)."""
    body, code = await request.app[CACHE_COUNTS].get(lambda: _cache_counts(request))
    return json_response(body, code)


async def _probe(client: RedisClient) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "connected"}
    ping, probe = await client.pipeline(
        [("PING",), ("SET", keys.HEALTH_PROBE, "1", "PX", PROBE_TTL_MS)]
    )
    if isinstance(ping, Exception):
        raise ping
    _writable(probe, result)
    return result


def _not_ready_reason(check: dict[str, Any]) -> str:
    if check["status"] == "refused":
        return f"Redis is refusing commands ({check['reason']})"
    if check["status"] == "timeout":
        return "Redis did not answer in time"
    return "Redis unreachable"


async def ready(request: web.Request) -> web.Response:
    """GET /health/ready: 200 only when Redis serves reads (both tiers); says if not writes."""
    redis = request.app[RUNTIME].redis
    checks = await asyncio.gather(_bounded(_probe(redis["hot"])), _bounded(_probe(redis["warm"])))
    for check in checks:
        if check["status"] not in SERVING:
            return json_response({"status": "not ready", "reason": _not_ready_reason(check)}, 503)
    body: dict[str, Any] = {"status": "ready"}
    refusing = sorted({check["reason"] for check in checks if check["status"] == "read-only"})
    if refusing:
        body["degraded"] = f"Redis refuses writes ({', '.join(refusing)})"
    return json_response(body)


async def live(request: web.Request) -> web.Response:
    """GET /health/live: answering at all proves the event loop turns."""
    return json_response({"status": "alive"})


async def prometheus_text(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, aggregated over the pod's processes when multiprocess,
    with the queue's depth (engine/metrics/scrape.py)."""
    body, content_type = await request.app[SCRAPER].scrape()
    # content_type= would reject the charset parameter that Prometheus's type carries.
    return web.Response(body=body, headers={"Content-Type": content_type})


ROUTES = [
    web.get("/health", health),
    web.get("/health/redis", health_redis),
    web.get("/health/timeline", health_timeline),
    web.get("/health/ca", health_ca),
    web.get("/health/cache", health_cache),
    web.get("/health/ready", ready),
    web.get("/health/live", live),
    web.get("/metrics", prometheus_text),
]

"""Daily service metrics in Redis (GET /api/prefetch/metrics), batched per process.

Counting on the read path must cost no round trip: each process adds to an in-memory tally
and a background task folds it into `prefetch:metrics:{m}:day:<date>` every second with one
pipeline. Durations go into fixed buckets so that every process's share adds up exactly and
percentiles can be read back for any day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from engine.broker.jobs import ORIGINS
from engine.metrics import prometheus
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.fastredis import Script
from engine.throttle import LogThrottle

log = logging.getLogger(__name__)

_FLUSH = Script.load(__file__, "flush.lua")

# Upper bounds (ms) of the duration buckets; the last bucket is open.
BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
FIELDS = ("hotHits", "warmHits", "misses", "totalJobs", "successful", "failed", "durationMs")


def utc_day(epoch_s: float | None = None) -> str:
    """`YYYY-MM-DD` of a UTC instant (now by default)."""
    return datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, UTC).strftime(
        "%Y-%m-%d"
    )


def _bucket(duration_ms: float) -> str:
    for bound in BUCKETS_MS:
        if duration_ms <= bound:
            return f"le{bound}"
    return "inf"


class StatsRecorder:
    """Tallies events in memory; `flush` (and the background loop) moves them to Redis."""

    def __init__(self, redis: RedisClient, retention_days: int, interval_s: float = 1.0) -> None:
        self._redis = redis
        self._retention_s = retention_days * 86_400 + 86_400
        self._interval = interval_s
        self._tally: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        # While Redis refuses writes the flush fails every second: one line per interval.
        self._warnings = LogThrottle(log)

    def hit(self, tier: str) -> None:
        self._tally["hotHits" if tier == "hot" else "warmHits"] += 1

    def miss(self) -> None:
        self._tally["misses"] += 1

    def prefetch(self, ok: bool, duration_ms: float, origin: str) -> None:
        """One prefetch operation finished; `origin` is what started it (jobs.ORIGINS)."""
        tally = self._tally
        tally["totalJobs"] += 1
        tally[f"origin:{origin}"] += 1
        tally["successful" if ok else "failed"] += 1
        tally["durationMs"] += round(duration_ms)
        tally[_bucket(duration_ms)] += 1

    def prefetch_read(self, origin: str, count: int = 1) -> None:
        """`count` entries prefetched by `origin` were served by a read before they expired."""
        self._tally[f"read:{origin}"] += count
        prometheus.PREFETCHED_READ.labels(origin=origin).inc(count)

    def prefetch_wasted(self, origin: str, count: int = 1) -> None:
        """`count` entries prefetched by `origin` expired (or were replaced) unread."""
        self._tally[f"wasted:{origin}"] += count
        prometheus.PREFETCHED_WASTED.labels(origin=origin).inc(count)

    async def flush(self) -> None:
        """Add the tally to today's hash and the lifetime hash, all or nothing (one script on
        one slot, also on a Cluster); keep it for the next flush if Redis is down or refuses
        writes (OOM, LOADING)."""
        if not self._tally:
            return
        tally, self._tally = self._tally, Counter()
        pairs: list[Any] = []
        for field, amount in tally.items():
            pairs += (field, amount)
        try:
            await self._redis.evalsha_or_eval(
                _FLUSH,
                [keys.metrics_day(utc_day()), keys.METRICS_TOTAL],
                [self._retention_s, *pairs],
            )
        except Exception:
            self._tally.update(tally)  # counted again at the next flush
            raise

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception as exc:  # Redis down: keep counting, try again next second
                self._warnings.warning(
                    "flush", "metrics flush failed (kept for the next one): %r", exc
                )

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stats-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()


async def read_day(redis: RedisClient, day: str | None) -> dict[str, Any]:
    """The seed's metrics shape for one UTC day (None: lifetime), with p50/p95/p99 estimates."""
    key = keys.METRICS_TOTAL if day is None else keys.metrics_day(day)
    raw = await redis.execute("HGETALL", key)
    values = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
    hot, warm, misses = (values.get(f, 0) for f in ("hotHits", "warmHits", "misses"))
    reads = hot + warm + misses
    jobs = values.get("totalJobs", 0)
    return {
        "cache": {
            "hitRate": round((hot + warm) / reads, 4) if reads else 0,
            "hotHits": hot,
            "warmHits": warm,
            "misses": misses,
        },
        "prefetch": {
            "totalJobs": jobs,
            "successful": values.get("successful", 0),
            "failed": values.get("failed", 0),
            "avgDuration": round(values.get("durationMs", 0) / jobs) if jobs else 0,
            **_percentiles(values, jobs),
            # Not interpolated: each pNN is the upper bound of the bucket that holds it.
            "percentilesAre": "bucketUpperBoundsMs",
            "byOrigin": {origin: values.get(f"origin:{origin}", 0) for origin in ORIGINS},
        },
        "usefulness": _usefulness(values),
    }


def _precision(read: int, wasted: int) -> float | None:
    return round(read / (read + wasted), 4) if read + wasted else None


def _usefulness(values: dict[str, int]) -> dict[str, Any]:
    """Prefetched entries read before they expired, and wasted ones (expired or replaced
    unread), in all and by origin; precision is read / (read + wasted), null without data."""
    by_origin: dict[str, dict[str, Any]] = {}
    for origin in ORIGINS:
        read, wasted = values.get(f"read:{origin}", 0), values.get(f"wasted:{origin}", 0)
        by_origin[origin] = {
            "readBeforeExpiry": read,
            "wasted": wasted,
            "precision": _precision(read, wasted),
        }
    read = sum(o["readBeforeExpiry"] for o in by_origin.values())
    wasted = sum(o["wasted"] for o in by_origin.values())
    return {
        "readBeforeExpiry": read,
        "wasted": wasted,
        "precision": _precision(read, wasted),
        "byOrigin": by_origin,
    }


def _percentiles(values: dict[str, int], total: int) -> dict[str, int | None]:
    """Upper bounds (ms) of the buckets holding the 50th, 95th and 99th percentile."""
    out: dict[str, int | None] = {"p50": None, "p95": None, "p99": None}
    if not total:
        return out
    seen = 0
    targets = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
    for bound in (*BUCKETS_MS, None):
        seen += values.get(f"le{bound}" if bound is not None else "inf", 0)
        for name, share in targets.items():
            if out[name] is None and seen >= share * total:
                out[name] = bound if bound is not None else BUCKETS_MS[-1]
    return out

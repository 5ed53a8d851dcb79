"""The unit of work: fetch a user's timeline, encode it once, store it in its tier.

Used by the API (`immediate`, read-through on a cache miss) and by the job actors. Callers
that finish an operation record it in StatsRecorder; a queued job records once, at its final
outcome, not at every attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec

from engine import tracing, wire
from engine.errors import RedisUnavailable
from engine.metrics import prometheus, tally
from engine.metrics.daily import StatsRecorder
from engine.store.cache import TimelineCache
from engine.store.entry import decompress, unstamp
from engine.throttle import LogThrottle
from engine.upstream import TimelineClient

# One line per 10 s: while Redis refuses writes every read-through would log.
_unstored_log = LogThrottle(logging.getLogger(__name__))
# Read-throughs decoding and encoding at once, per process. Each holds ~230 KB while it runs
# (the upstream body, 100 decoded posts, two encoded bodies); 256 at once took an API process
# from 57 MB to 115 MB for good (freed memory stays with the allocator). Misses beyond this
# wait for a slot; 64 keeps the peak near 15 MB.
READ_THROUGH_SLOTS = 64


def tier_of(priority: str) -> str:
    """High-priority work goes to the hot tier, the rest to warm."""
    return "hot" if priority == "high" else "warm"


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """The `data` of POST /api/prefetch/immediate/{userId}."""

    success: bool
    cached: bool
    tier: str
    postsCount: int
    duration: int
    stored: bool = True


@dataclass(frozen=True, slots=True)
class ReadThrough:
    """A read-through's answer: the body (plain JSON, `meta.cached: false`), and the entity
    tag and expiry (epoch ms) of the entry stored from it; None and 0 when none was kept."""

    body: bytes
    tag: str | None = None
    expires_at: int = 0


class _Count(msgspec.Struct):
    postsCount: int


class _Entry(msgspec.Struct):
    data: _Count


_entry_decoder = msgspec.json.Decoder(_Entry)


class Prefetcher:
    """Fetch → encode → guarded store, plus the API's single-flight read-through."""

    def __init__(
        self, cache: TimelineCache, timeline: TimelineClient, stats: StatsRecorder
    ) -> None:
        self.cache = cache
        self.timeline = timeline
        self.stats = stats
        self._flights: dict[str, asyncio.Future[ReadThrough]] = {}
        self._read_through_slots = asyncio.Semaphore(READ_THROUGH_SLOTS)

    async def prefetch(
        self,
        user_id: str,
        priority: str,
        *,
        force: bool = False,
        count_cached: bool = False,
        origin: str | None = None,
    ) -> PrefetchResult:
        """Make sure the user has a fresh entry in the tier of `priority`; raises UpstreamError.

        A fresh hot entry makes it a no-op unless `force` (an event changed the timeline).
        `origin` marks the stored entry as prefetched by it, until a read serves it.
        """
        if tracing.tracer is not None:
            attributes = {"prefetch.user_id": user_id, "prefetch.priority": priority}
            with tracing.span("prefetch", attributes=attributes):
                return await self._prefetch(user_id, priority, force, count_cached, origin)
        return await self._prefetch(user_id, priority, force, count_cached, origin)

    async def _prefetch(
        self, user_id: str, priority: str, force: bool, count_cached: bool, origin: str | None
    ) -> PrefetchResult:
        started = time.perf_counter()
        tier = tier_of(priority)
        ticket = await self.cache.begin(user_id, tier, check_hot=not force, origin=origin)
        if ticket.hot_fresh:
            count = await self._hot_count(user_id) if count_cached else 0
            return PrefetchResult(True, True, "hot", count, _ms_since(started))
        posts = await self.timeline.fetch(user_id)
        body = wire.cached_body(posts, int(time.time() * 1000), tier, cached=True)
        ttl = self.cache.settings.entry_ttl_ms(tier, origin)
        entry = self.cache.encode(body, tier, ttl)
        stored = await self.cache.store(tier, user_id, entry, ticket, ttl)
        if stored.replaced is not None:
            self.stats.prefetch_wasted(stored.replaced)
        return PrefetchResult(True, False, tier, len(posts), _ms_since(started), stored.stored)

    async def immediate(self, user_id: str, priority: str) -> PrefetchResult:
        """A prefetch on behalf of an API caller, counted as one prefetch operation."""
        started = time.perf_counter()
        try:
            result = await self.prefetch(user_id, priority, count_cached=True, origin="immediate")
        except Exception:
            self.record(False, started, "immediate")
            raise
        self.record(True, started, "immediate")
        return result

    async def read_through(self, user_id: str) -> ReadThrough:
        """Fetch and store in warm a timeline nobody had cached; one fetch per user at a time.

        Returns the same answer (plain JSON, `meta.cached: false`) to every waiter.
        """
        flight = self._flights.get(user_id)
        if flight is None:
            flight = asyncio.ensure_future(self._bounded_read_through(user_id))
            self._flights[user_id] = flight
            flight.add_done_callback(lambda _: self._flights.pop(user_id, None))
        return await asyncio.shield(flight)

    async def _bounded_read_through(self, user_id: str) -> ReadThrough:
        async with self._read_through_slots:
            with tracing.span("read-through", attributes={"prefetch.user_id": user_id}):
                return await self._read_through(user_id)

    async def _read_through(self, user_id: str) -> ReadThrough:
        started = time.perf_counter()
        ok = True
        kept = None
        try:
            ticket = await self.cache.begin(user_id, "warm", check_hot=False)
            posts = await self.timeline.fetch(user_id)
            fetched_at = int(time.time() * 1000)
            entry = self.cache.encode(
                wire.cached_body(posts, fetched_at, "warm", cached=True), "warm"
            )
            try:
                done = await self.cache.store("warm", user_id, entry, ticket)
            except RedisUnavailable as exc:
                # The reader waited for this body: serve it though it could not be kept (Redis
                # out of memory, read-only, gone); the operation counts as failed.
                _unstored_log.warning(
                    "unstored", "read-through for %s not stored: %s", user_id, exc
                )
                ok = False
            else:
                if done.replaced is not None:
                    self.stats.prefetch_wasted(done.replaced)
                if done:
                    kept = unstamp(entry)
        except Exception:
            self.record(False, started, "read-through")
            raise
        self.record(ok, started, "read-through")
        body = wire.cached_body(posts, fetched_at, "warm", cached=False)
        if kept is None:
            return ReadThrough(body)
        return ReadThrough(body, kept.tag, kept.expires_at)

    def record(self, ok: bool, started: float, origin: str) -> None:
        """Count one finished prefetch operation, started by `origin`, in the stats."""
        self.count(ok, time.perf_counter() - started, origin)

    def count(self, ok: bool, elapsed: float, origin: str) -> None:
        """Count one prefetch operation that finished after `elapsed` seconds."""
        self.stats.prefetch(ok, elapsed * 1000, origin)
        # Tallied, published once a second (engine/metrics/tally.py).
        tally.inc(prometheus.operations(origin, ok))
        tally.observe(prometheus.QUEUE_DURATION, elapsed)
        tally.inc(prometheus.JOB_COMPLETED if ok else prometheus.JOB_FAILED)

    async def _hot_count(self, user_id: str) -> int:
        found = await self.cache.read(user_id)
        if found is None:
            return 0
        try:
            return _entry_decoder.decode(decompress(found[1])).data.postsCount
        except msgspec.DecodeError:
            return 0


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)

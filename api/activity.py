"""Batched activity recording: who read a timeline (or was reported active) lately.

The read path only adds a user id to an in-memory set (and, for a cache hit, notes the tier
that served it); a background task hands the sets to the strategies once a second: one
script per key shard records the users in the sharded activity indexes (and app opens in the
predictive profile), and one per shard and tier counts the hits that used a prefetched entry
(engine.strategies.usefulness). Recording therefore costs no round trip per read. A user who
opens the app with a refresh deferred by an event (engine.strategies.events) and was served
from cache gets that refresh scheduled by the flush.

What `POST /api/activity`'s 202 promises: the users are held in this process's buffer and
will be written within about a second, because the last write to Redis landed. While the
last flush failed (Redis down, or refusing writes: out of memory, read-only), the route
answers 503 with that failure's code instead, and the flush loop keeps probing Redis with
a write so that the route accepts again as soon as Redis does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from engine.errors import Busy, RedisRefused, RedisUnavailable
from engine.runtime import Runtime
from engine.store import keys
from engine.store.cache import wall_clock_ms
from engine.strategies.activity import record_activity
from engine.strategies.events import refresh_at_open
from engine.strategies.usefulness import count_reads

log = logging.getLogger(__name__)

# While Redis is down pending ids are kept; past this many, new ones are dropped (the set
# only grows with distinct users, but a long outage must not grow it without bound).
MAX_PENDING = 200_000
# Users per round trip of a flush (see `flush`).
FLUSH_SLICE = 128
# The probe write made while recording fails and nothing is pending (see `_loop`).
PROBE_TTL_MS = 60_000


class ActivityBatcher:
    """Collects active user ids (and cache hits by tier) and flushes them every `interval_s`."""

    def __init__(self, runtime: Runtime, interval_s: float = 1.0) -> None:
        self._runtime = runtime
        self._interval = interval_s
        self._pending: set[str] = set()
        self._served: dict[str, set[str]] = {"hot": set(), "warm": set()}
        self._task: asyncio.Task[None] | None = None
        self._failure: RedisUnavailable | None = None

    @property
    def failure(self) -> RedisUnavailable | None:
        """Why the last write to Redis failed; None while writes land."""
        return self._failure

    def accept(self, user_ids: Iterable[str]) -> int:
        """Take users reported active (POST /api/activity), all or none; return how many
        distinct ids were given. Raises the last flush's failure (503 REDIS_UNAVAILABLE or
        REDIS_REFUSED) while Redis takes no writes, and Busy (503) when the buffer is full."""
        failure = self._failure
        if failure is not None:
            # A new exception each time: raising one instance again would grow its traceback.
            if isinstance(failure, RedisRefused):
                raise RedisRefused(str(failure), failure.kind)
            raise RedisUnavailable(str(failure))
        distinct = set(user_ids)
        if len(self._pending) + len(distinct) > MAX_PENDING:
            raise Busy("activity buffer full", public="Too much activity pending; retry later")
        self._pending |= distinct
        return len(distinct)

    def add(self, user_id: str, tier: str | None = None) -> None:
        """Note one user as active now; `tier`: a cache hit in that tier served it."""
        if len(self._pending) < MAX_PENDING:
            self._pending.add(user_id)
            if tier is not None:
                self._served[tier].add(user_id)

    def add_many(self, user_ids: Iterable[str]) -> int:
        """Note several users as active now; return how many distinct ids were given."""
        distinct = set(user_ids)
        room = MAX_PENDING - len(self._pending)
        if room >= len(distinct):
            self._pending |= distinct
        elif room > 0:
            self._pending.update(list(distinct)[:room])
        return len(distinct)

    def is_pending(self, user_id: str) -> bool:
        """Whether the user was noted since the last flush (active now, not yet in Redis)."""
        return user_id in self._pending

    async def flush(self) -> None:
        """Record the pending ids; keep them for the next try if Redis fails."""
        if not self._pending:
            return
        users, self._pending = self._pending, set()
        served, self._served = self._served, {"hot": set(), "warm": set()}
        runtime = self._runtime
        try:
            changed: list[str] = []
            # In slices, each a round trip of its own: a flush of a second's ~1,000 users is
            # ~1,300 script calls (one per key shard), which in one pipeline held up the reads
            # queued behind it in Redis and on the hot connection (tuning.md, p99).
            user_list, hot, warm = list(users), list(served["hot"]), list(served["warm"])
            now = wall_clock_ms()
            for start in range(0, max(len(user_list), len(hot), len(warm)), FLUSH_SLICE):
                part = user_list[start : start + FLUSH_SLICE]
                part_served = {
                    "hot": set(hot[start : start + FLUSH_SLICE]),
                    "warm": set(warm[start : start + FLUSH_SLICE]),
                }
                recorded, _ = await asyncio.gather(
                    record_activity(runtime.redis["background"], runtime.settings, part, now),
                    count_reads(runtime.redis, part_served, runtime.stats),
                )
                changed += recorded.changed
            if changed and runtime.settings.enable_event_triggered:
                # Refreshes an event deferred: due now that these users opened the app.
                await refresh_at_open(runtime.jobs, changed, served["hot"] | served["warm"])
        except Exception as exc:
            # Recording again is harmless (a later time, one more count). Hits are offered
            # again too: a mark cleared (and counted) already is not found a second time.
            self.add_many(users)
            for tier, hit in served.items():
                self._served[tier] |= hit
            self._failed(exc)
            raise
        self._failure = None

    async def _probe(self) -> None:
        """A write to the metrics DB, to learn when Redis takes writes again."""
        try:
            await self._runtime.redis["background"].execute(
                "SET", keys.HEALTH_PROBE, "1", "PX", PROBE_TTL_MS
            )
        except Exception as exc:
            self._failed(exc)
            raise
        self._failure = None

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, RedisUnavailable):  # RedisRefused too
            self._failure = exc
        else:
            self._failure = RedisUnavailable(f"activity flush failed: {exc!r}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self._failure is not None and not self._pending:
                    await self._probe()
                else:
                    await self.flush()
            except Exception as exc:  # Redis down: keep the ids, try again next interval
                log.debug("activity flush failed: %r", exc)

    def start(self) -> None:
        """Start the background flush task (on the running loop)."""
        self._task = asyncio.create_task(self._loop(), name="activity-flush")

    async def stop(self) -> None:
        """Stop the task and make one last flush, so a clean shutdown loses nothing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

"""Event-triggered refreshes: a change upstream refreshes the timelines someone will read.

`POST /api/prefetch/events` (api/views_prefetch.py) validates the event and calls
`refresh_or_invalidate` with the affected users:

- a user who was active within ACTIVITY_WINDOW (or is about to be recorded as active:
  `pending`) is reading now: a **forced** `high` refresh (origin `event`); the old entry
  keeps being served until the new one lands, and stays if the upstream fails;
- a user who is not reading but has an entry is **deferred**: the entry stays as it is, and
  the user is marked changed (a per-shard index in the metrics DB). It waits for an app
  open that may be an hour away (a predictive prefetch, or a session's entry that a return
  may read), and a user follows about 50 posters: refetching at every event would cost
  several fetches per app open (the replayed week measured 3.5 where the budget is 2). At
  the user's next app open, the activity flush takes the mark (record.lua) and, when the open
  was served from cache, schedules the refresh then (`refresh_at_open`): the open is
  instant, the reads after it are fresh; one fetch per open at most, whatever the events;
- the others are invalidated: nobody will read them.

No tick is involved. The decision takes the time as an argument, like the scheduler's, so a
replay can drive it in virtual time (bench/replay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import TimelineCache
from engine.store.client import RedisClient
from engine.strategies.activity import active_since
from engine.strategies.shards import by_shard, commands

EVENT_TYPES = frozenset(
    {"post.created", "post.updated", "post.deleted", "follow.created", "follow.deleted"}
)


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """How many affected users were refreshed, invalidated and deferred."""

    refreshed: int
    invalidated: int
    deferred: int = 0


REFRESH, DEFER, DROP = "refresh", "defer", "drop"


def _never(user: str) -> bool:
    return False


async def decide(
    cache: TimelineCache,
    metrics: RedisClient,
    settings: Settings,
    users: list[str],
    now_ms: int,
    pending: Callable[[str], bool] = _never,
) -> list[str]:
    """For each user: REFRESH, DEFER or DROP (see the module docstring)."""
    since_ms = now_ms - settings.activity_window_ms
    cached, active = await asyncio.gather(
        asyncio.gather(*(cache.exists(user) for user in users)),
        active_since(metrics, users, since_ms),
    )
    return [
        REFRESH if is_active or pending(user) else DEFER if has_entry else DROP
        for user, has_entry, is_active in zip(users, cached, active, strict=True)
    ]


async def refresh_or_invalidate(
    cache: TimelineCache,
    jobs: JobQueue,
    metrics: RedisClient,
    settings: Settings,
    users: list[str],
    now_ms: int,
    pending: Callable[[str], bool] = _never,
) -> EventOutcome:
    """Refresh (forced, high, origin `event`) the users someone reads, keep the predictive
    entries that wait for an open, invalidate the others."""
    if not users:
        return EventOutcome(0, 0)
    verdicts = await decide(cache, metrics, settings, users, now_ms, pending)
    refresh = [user for user, v in zip(users, verdicts, strict=True) if v == REFRESH]
    drop = [user for user, v in zip(users, verdicts, strict=True) if v == DROP]
    defer = [user for user, v in zip(users, verdicts, strict=True) if v == DEFER]
    await asyncio.gather(
        _refresh(jobs, refresh),
        *(cache.invalidate(user) for user in drop),
        mark_changed(metrics, defer, now_ms),
    )
    return EventOutcome(len(refresh), len(drop), len(defer))


async def mark_changed(metrics: RedisClient, users: list[str], now_ms: int) -> None:
    """Mark users whose refresh was deferred (one pipelined round trip)."""
    if users:
        await commands(
            metrics,
            [
                ("ZADD", keys.changed_index(shard), *(x for u in group for x in (now_ms, u)))
                for shard, group in by_shard(users).items()
            ],
        )


async def refresh_at_open(jobs: JobQueue, changed: Iterable[str], served: set[str]) -> int:
    """Schedule the deferred refreshes of users who just opened the app and were served from
    cache (a miss fetched a fresh timeline already); returns how many."""
    due = [user for user in changed if user in served]
    await _refresh(jobs, due)
    return len(due)


async def _refresh(jobs: JobQueue, users: list[str]) -> None:
    """The event refresh: forced (an existing entry is replaced), high, origin `event`."""
    await asyncio.gather(
        *(jobs.schedule(user, "high", origin="event", force=True) for user in users)
    )


async def trim_changed(metrics: RedisClient, settings: Settings, now_ms: int) -> None:
    """Forget marks older than any entry lives: the entry they were for has expired."""
    oldest = now_ms - max(settings.predictive_ttl_ms, settings.warm_ttl_ms)
    await commands(
        metrics,
        [
            ("ZREMRANGEBYSCORE", keys.changed_index(shard), "-inf", f"({oldest}")
            for shard in range(keys.SHARDS)
        ],
    )

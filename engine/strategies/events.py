"""Event-triggered refreshes: a change upstream refreshes the timelines someone will read.

`POST /api/prefetch/events` (api/views_prefetch.py) validates the event and calls
`refresh_or_invalidate` with the affected users:

- a user who was active within ACTIVITY_WINDOW (or is about to be recorded as active:
  `pending`) is reading now: a **forced** `high` refresh (origin `event`); the old entry
  keeps being served until the new one lands, and stays if the upstream fails;
- a user who is not reading but has an entry is **deferred**: the entry stays as it is.
  It waits for an app open that may be an hour away (a predictive prefetch, or a session's
  entry that a return may read), and a user follows about 50 posters: refetching at every
  event would cost several fetches per app open (the replayed week measured 3.5 where the
  budget is 2). The replay reports how often an app open got an entry older than a post in it;
- the others are invalidated: nobody will read them.

No tick is involved. The decision takes the time as an argument, like the scheduler's, so a
replay can drive it in virtual time (bench/replay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store.cache import TimelineCache
from engine.store.client import RedisClient
from engine.strategies.activity import active_since

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
    await asyncio.gather(
        *(jobs.schedule(user, "high", origin="event", force=True) for user in refresh),
        *(cache.invalidate(user) for user in drop),
    )
    return EventOutcome(len(refresh), len(drop), len(users) - len(refresh) - len(drop))

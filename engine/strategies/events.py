"""Event-triggered refreshes: a change upstream refreshes the timelines someone will read.

`POST /api/prefetch/events` (api/views_prefetch.py) validates the event and calls
`refresh_or_invalidate` with the affected users: each user who has an entry in either tier,
or was active within ACTIVITY_WINDOW (or is about to be recorded as active: `pending`), gets a
**forced** `high` refresh (origin `event`): the old entry keeps being served until the new one
lands, and stays if the upstream fails. The others are invalidated: nobody will read them.
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
    """How many affected users were refreshed and how many invalidated."""

    refreshed: int
    invalidated: int


def _never(user: str) -> bool:
    return False


async def wanted(
    cache: TimelineCache,
    metrics: RedisClient,
    settings: Settings,
    users: list[str],
    now_ms: int,
    pending: Callable[[str], bool] = _never,
) -> list[bool]:
    """For each user: is there an entry in either tier, or was the user active lately?"""
    since_ms = now_ms - settings.activity_window_ms
    cached, active = await asyncio.gather(
        asyncio.gather(*(cache.exists(user) for user in users)),
        active_since(metrics, users, since_ms),
    )
    return [
        has_entry or is_active or pending(user)
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
    """Refresh (forced, high, origin `event`) the wanted users; invalidate the others."""
    if not users:
        return EventOutcome(0, 0)
    want = await wanted(cache, metrics, settings, users, now_ms, pending)
    refresh = [user for user, w in zip(users, want, strict=True) if w]
    drop = [user for user, w in zip(users, want, strict=True) if not w]
    await asyncio.gather(
        *(jobs.schedule(user, "high", origin="event", force=True) for user in refresh),
        *(cache.invalidate(user) for user in drop),
    )
    return EventOutcome(len(refresh), len(drop))

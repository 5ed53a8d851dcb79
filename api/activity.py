"""Batched activity recording: who read a timeline (or was reported active) lately.

The read path only adds a user id to an in-memory set; a background task writes the set to
Redis once a second in one pipeline: ZADD of the activity zset (user -> last active, epoch
ms) and an INCR of the user's activity counter, which expires after the activity window.
The activity strategy ranks users by both. Recording therefore costs no round trip per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from engine.store import keys
from engine.store.fastredis import FastRedis

log = logging.getLogger(__name__)

# One ZADD per this many members keeps a single reply (and Redis's blocking time) small.
ZADD_CHUNK = 1000
# While Redis is down pending ids are kept; past this many, new ones are dropped (the set
# only grows with distinct users, but a long outage must not grow it without bound).
MAX_PENDING = 200_000


class ActivityBatcher:
    """Collects active user ids and flushes them to Redis every `interval_s`."""

    def __init__(self, redis: FastRedis, window_ms: int, interval_s: float = 1.0) -> None:
        self._redis = redis
        self._window_ms = window_ms
        self._interval = interval_s
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, user_id: str) -> None:
        """Note one user as active now."""
        if len(self._pending) < MAX_PENDING:
            self._pending.add(user_id)

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
        """Write the pending ids in one pipeline; keep them for the next try if Redis fails."""
        if not self._pending:
            return
        users, self._pending = self._pending, set()
        now_ms = int(time.time() * 1000)
        ordered = list(users)
        commands: list[tuple[Any, ...]] = []
        for start in range(0, len(ordered), ZADD_CHUNK):
            chunk = ordered[start : start + ZADD_CHUNK]
            members: list[Any] = []
            for user in chunk:
                members += (now_ms, user)
            commands.append(("ZADD", keys.ACTIVITY, *members))
        for user in ordered:
            counter = keys.activity_count(user)
            commands.append(("INCR", counter))
            commands.append(("PEXPIRE", counter, self._window_ms))
        try:
            replies = await self._redis.pipeline(commands)
        except Exception:
            self.add_many(users)
            raise
        if any(isinstance(reply, Exception) for reply in replies):
            log.warning("activity flush: some commands were refused: %r", replies[:3])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
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

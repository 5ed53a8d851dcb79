"""Hands back messages stranded in this worker's ack sets: fetched in Redis, held nowhere here.

A Dramatiq fetch moves message ids into the consumer's ack set and replies with their data
in one script call. When the connection drops after the script ran but before the reply
arrived (Redis killed, a network cut), or a message could not be decoded, those ids stay in
this worker's ack set, and nothing runs them: the supervisor requeues a worker's ack sets
only when the worker dies, and Dramatiq's heartbeat maintenance only for a worker that
stopped beating.
The job is lost for as long as the worker lives, and its user's pending mark swallows every
new schedule meanwhile.

So every `RECLAIM_EVERY_S` the worker compares its ack sets with the messages it holds (the
delayed messages held until their eta, the work queue, the executor's running and unsettled
jobs). An id missing from all of them in two readings in a row (a fetch's reply in transit
is in hand by the second) is handed back to its queue by settle.lua's `back`, which moves
it only while it is still in this worker's ack set.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine.broker import dramatiq_layout as layout
from engine.broker.dramatiq_worker import LoopWorker
from engine.broker.executor import Executor, is_transient
from engine.broker.jobs import FAILED_KEEP, QUEUES
from engine.errors import RedisReplyError, RedisUnavailable
from engine.store.fastredis import Arg, FastRedis

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 5.0
WARN_EVERY_S = 30.0


class Reclaimer:
    """Finds this worker's stranded messages and hands them back (see the module docstring)."""

    def __init__(
        self, broker_id: str, redis: FastRedis, worker: LoopWorker, executor: Executor
    ) -> None:
        self._broker_id = broker_id
        self._redis = redis
        self._worker = worker
        self._executor = executor
        self._queues = layout.all_queues(list(QUEUES.values()))
        self._suspects: set[tuple[str, str]] = set()
        self._last_warning = 0.0
        self.reclaimed = 0

    async def sweep(self) -> int:
        """One reading; hands back what was missing in this one and the last. Returns how many."""
        replies = await self._redis.pipeline(
            [("SMEMBERS", layout.acks_key(self._broker_id, q)) for q in self._queues]
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        # In memory after Redis: a message settled in between is missing from both, and
        # `back` finds it gone from the ack set and leaves it alone.
        held = self._worker.held_ids() | self._executor.held_ids()
        missing = {
            (queue, member.decode())
            for queue, members in zip(self._queues, replies, strict=True)
            for member in members
            if member.decode() not in held
        }
        stranded, self._suspects = missing & self._suspects, missing - self._suspects
        if not stranded:
            return 0
        groups: list[Arg] = []
        for queue, redis_id in sorted(stranded):
            groups += layout.settle_group("back", queue, redis_id, None)
        moved = sum(await layout.settle(self._redis, self._broker_id, groups, FAILED_KEEP))
        if moved:
            self.reclaimed += moved
            log.warning(
                "handed back %d messages stranded in this worker's ack sets "
                "(fetched, but their data never reached it)",
                moved,
            )
        return moved

    async def run(self) -> None:
        """Sweep every RECLAIM_EVERY_S until cancelled; Redis failures wait for the next."""
        while True:
            await asyncio.sleep(RECLAIM_EVERY_S)
            try:
                await self.sweep()
            except (RedisUnavailable, RedisReplyError) as exc:
                now = time.monotonic()
                if now - self._last_warning >= WARN_EVERY_S:
                    self._last_warning = now
                    level = logging.INFO if is_transient(exc) else logging.WARNING
                    log.log(level, "stranded-message sweep skipped: %r", exc)

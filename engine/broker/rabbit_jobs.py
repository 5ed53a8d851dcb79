"""The job queue on RabbitMQ: messages on the broker, pending marks and records in Redis.

The marks, the failed list, the counters and the scheduler lease stay in the queue role's
Redis; the messages go to RabbitMQ. The two are different servers, so what was one atomic
script on Redis becomes ordered steps whose every crash point errs on the side of running a
job twice, never of losing it:

- Schedule: mark the user under a short lease (MARK_LEASE_MS, dedup checked in the same
  step), publish and wait for the broker's confirm, then extend the mark to the life of a
  queued job. A publish that fails or times out drops the mark. If the process dies between
  the mark and the publish, the mark alone survives for at most MARK_LEASE_MS: schedules of
  that user within that window are answered by a job that does not exist (the window a mark
  can outlive its message). A retry leaves the failed list only once its message is confirmed.
- Fenced batch (the strategies' leader): check that the lease holds the leader's value and
  will for at least the fence margin, then publish, and accept it only if the broker
  confirmed within that margin, measured from before the check. So a confirmed batch landed
  while the lease was still the leader's. A publish not confirmed in time may still land
  later, after another leader took over: the enqueue counts as fenced (the leader steps
  down), and at worst that one batch duplicates work the new leader schedules.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from engine.broker import rabbit_broker
from engine.broker.jobs import (
    PRIORITY_RANK,
    QUEUES,
    Fence,
    JobQueue,
    Scheduled,
    _next_job_id,
    job_kwargs,
    job_message,
    new_job_id,
    scheduled_from_reply,
)
from engine.broker.rabbit_broker import Publisher
from engine.errors import BrokerTimeout
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis, Script

_MARK = Script.load(__file__, "rabbit_mark.lua")
_CONFIRM = Script.load(__file__, "rabbit_confirm.lua")
_UNMARK = Script.load(__file__, "rabbit_unmark.lua")
_FENCE = Script.load(__file__, "rabbit_fence.lua")

PUBLISH_TIMEOUT_S = 5.0
# Longer than a publish may take: a mark still 'publishing' after this was never confirmed.
MARK_LEASE_MS = 10_000
# How long a queued job's mark lives past its delay (as on Redis).
PENDING_TTL_MS = 3_600_000
STATS_TIMEOUT_S = 2.0


def fence_margin_ms(settings: Settings) -> int:
    """How long a fenced publish may take: a third of the lease, at most 2 s (the leader
    renews every third of its TTL, so a live lease has more than that left)."""
    return max(100, min(2_000, settings.scheduler_lease_ttl_ms // 3))


class RabbitJobQueue(JobQueue):
    """JobQueue whose messages live on RabbitMQ (the rest as on Redis)."""

    def __init__(self, redis: FastRedis, publisher: Publisher, settings: Settings) -> None:
        super().__init__(redis, publisher.broker)
        self._publisher = publisher
        self._fence_margin_ms = fence_margin_ms(settings)

    async def _schedule(
        self,
        user_id: str,
        priority: str,
        delay_ms: int,
        job_id: str | None,
        origin: str,
        force: bool,
        failed_record: bytes | None,
    ) -> Scheduled:
        job_id = job_id or new_job_id(user_id)
        kwargs = job_kwargs(origin, force)
        pending = keys.pending_job(user_id)
        retry_keys = [keys.FAILED_JOBS] if failed_record is not None else []
        retry_args = [failed_record] if failed_record is not None else []
        while True:
            message = job_message(priority, (user_id, job_id), kwargs)
            reply = await self._redis.evalsha_or_eval(
                _MARK,
                [pending, *retry_keys],
                [
                    job_id,
                    PRIORITY_RANK[priority],
                    priority,
                    delay_ms,
                    message.message_id,
                    MARK_LEASE_MS,
                    1 if force else 0,
                    QUEUES[priority],
                    *retry_args,
                ],
            )
            if reply[0] != 2:
                break
            job_id = _next_job_id(job_id)
        scheduled = scheduled_from_reply(user_id, reply)
        if not scheduled.deduplicated:
            try:
                await self._publisher.publish(message, delay_ms or None, PUBLISH_TIMEOUT_S)
            except BaseException:
                await _drop_mark(self._redis, pending, job_id)
                raise
            await self._redis.evalsha_or_eval(
                _CONFIRM, [pending, *retry_keys], [job_id, delay_ms + PENDING_TTL_MS, *retry_args]
            )
        return scheduled

    async def schedule_batch(
        self,
        user_ids: list[str],
        priority: str,
        *,
        origin: str = "schedule",
        force: bool = False,
        fence: Fence | None = None,
    ) -> str | None:
        batch_id = f"batch:{uuid.uuid4()}"
        message = job_message(priority, (user_ids, batch_id), job_kwargs(origin, force), batch=True)
        if fence is None:
            await self._publisher.publish(message, None, PUBLISH_TIMEOUT_S)
            return batch_id
        started = time.monotonic()
        holds = await self._redis.evalsha_or_eval(
            _FENCE, [fence.key], [fence.value, self._fence_margin_ms]
        )
        if holds != 1:
            return None
        budget = self._fence_margin_ms / 1000 - (time.monotonic() - started)
        try:
            await self._publisher.publish(message, None, budget)
        except BrokerTimeout:
            # Not confirmed within the lease's margin: it may land after the lease is gone,
            # so this leader can no longer prove it leads (a failed publish just raises).
            return None
        return batch_id

    async def stats(self) -> dict[str, Any]:
        """Ready counts from the broker (passive declares), what the workers hold from their
        gauges (written with every settle and each second), the counters from Redis."""
        queues = list(QUEUES.values())
        names = rabbit_broker.all_queues(queues)
        ready, replies = await asyncio.gather(
            self._publisher.ready_counts(names, STATS_TIMEOUT_S),
            self._redis.pipeline(
                [
                    ("GET", keys.JOBS_COMPLETED),
                    ("GET", keys.JOBS_FAILED),
                    ("HGETALL", keys.QUEUE_GAUGES),
                ]
            ),
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        now_ms = int(time.time() * 1000)
        held_active = dict.fromkeys(queues, 0)
        held_delayed = dict.fromkeys(queues, 0)
        raw_gauges = replies[2]
        for i in range(1, len(raw_gauges), 2):
            gauge = rabbit_broker.decode_gauge(raw_gauges[i], queues, now_ms)
            if gauge is not None:
                for q in queues:
                    held_active[q] += gauge[0][q]
                    held_delayed[q] += gauge[1][q]
        by_priority: dict[str, dict[str, int]] = {}
        for i, (priority, queue) in enumerate(QUEUES.items()):
            waiting, delayed, dead = ready[3 * i : 3 * i + 3]
            by_priority[priority] = {
                "waiting": waiting,
                "active": held_active[queue],
                "delayed": delayed + held_delayed[queue],
                "dead": dead,
            }
        return {
            "name": "prefetch",
            "waiting": sum(p["waiting"] for p in by_priority.values()),
            "active": sum(p["active"] for p in by_priority.values()),
            "completed": int(replies[0] or 0),
            "failed": int(replies[1] or 0),
            "delayed": sum(p["delayed"] for p in by_priority.values()),
            "dead": sum(p["dead"] for p in by_priority.values()),
            "byPriority": by_priority,
        }

    async def close(self) -> None:
        await self._publisher.close()


async def _drop_mark(redis: FastRedis, pending: str, job_id: str) -> None:
    try:
        await redis.evalsha_or_eval(_UNMARK, [pending], [job_id])
    except Exception:
        pass  # Redis away too: the mark's short lease ends it

"""The job queue as the API and the actors see it: schedule, dedup, stats, failures, retry.

Messages are Dramatiq messages on Dramatiq's Redis layout (namespace `prefetch:queue`), one
queue per priority. Scheduling writes them with our own script so that the one-pending-job-
per-user check and the enqueue are one atomic step (and one round trip) instead of three.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dramatiq

from engine import wire
from engine.errors import Conflict, NotFound
from engine.store import keys
from engine.store.fastredis import FastRedis, Script

PRIORITY_RANK = {"low": 1, "medium": 2, "high": 3}
# What started a prefetch: counted per origin in the metrics (GET /api/prefetch/metrics).
ORIGINS = ("schedule", "immediate", "read-through", "activity", "event", "predictive")
QUEUES = {"high": "high", "medium": "medium", "low": "low"}
# Dramatiq runs lower numbers first when several messages wait in a worker's memory.
ACTOR_PRIORITY = {"high": 0, "medium": 10, "low": 20}
FAILED_KEEP = 50
JOB_ID = re.compile(r"^prefetch:([0-9a-fA-F-]{36}):(\d{1,15})$")


def actor_name(priority: str, *, batch: bool = False) -> str:
    """The actor that runs one user (or a batch of users) of a priority."""
    return f"prefetch_batch_{priority}" if batch else f"prefetch_{priority}"


_last_ms = 0


def new_job_id(user_id: str) -> str:
    """`prefetch:{userId}:{epochMs}`, the milliseconds strictly rising within a process.

    Two schedules of one user in the same millisecond (a low, then a high that replaces it)
    must not share an id, or finishing the first would clear the second's pending mark.
    """
    global _last_ms
    _last_ms = max(int(time.time() * 1000), _last_ms + 1)
    return f"prefetch:{user_id}:{_last_ms}"


def _next_job_id(job_id: str) -> str:
    """The same job id one millisecond later."""
    head, _, millis = job_id.rpartition(":")
    return f"{head}:{int(millis) + 1}"


@dataclass(frozen=True, slots=True)
class Fence:
    """An enqueue fence: the message lands only while `key` holds `value` (a leader lease)."""

    key: str
    value: str


def job_kwargs(origin: str, force: bool) -> dict[str, Any]:
    """The keyword arguments every prefetch message carries to its actor."""
    if origin not in ORIGINS:
        raise ValueError(f"unknown prefetch origin {origin!r}")
    return {"origin": origin, "force": force}


def encode_message(
    queue: str,
    actor: str,
    args: tuple[Any, ...],
    delay_ms: int,
    kwargs: dict[str, Any] | None = None,
) -> tuple[str, str, bytes]:
    """(queue to push on, redis message id, encoded message) as Dramatiq's broker would write."""
    redis_id = str(uuid.uuid4())
    options: dict[str, Any] = {"redis_message_id": redis_id}
    if delay_ms > 0:
        queue = f"{queue}.DQ"
        options["eta"] = int(time.time() * 1000) + delay_ms
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue, actor_name=actor, args=args, kwargs=kwargs or {}, options=options
    )
    return queue, redis_id, message.encode()


_SCHEDULE = Script.load(__file__, "schedule.lua")

_FINISH = Script.load(__file__, "finish.lua")

_FAIL = Script.load(__file__, "fail.lua")

_PUSH = Script.load(__file__, "push.lua")


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The `data` of POST /api/prefetch/schedule/{userId}."""

    jobId: str
    userId: str
    priority: str
    delay: int
    deduplicated: bool


class JobQueue:
    """Queue operations over the queue DB; safe to share between coroutines of a process."""

    def __init__(self, redis: FastRedis) -> None:
        self._redis = redis

    async def schedule(
        self,
        user_id: str,
        priority: str,
        delay_ms: int = 0,
        job_id: str | None = None,
        *,
        origin: str = "schedule",
        force: bool = False,
    ) -> Scheduled:
        """Enqueue a prefetch unless the user has a pending job of equal or higher priority.

        `force`: the job refreshes the entry even when a fresh hot one exists (events); a
        pending job that is not forced does not cover a forced one.
        """
        job_id = job_id or new_job_id(user_id)
        kwargs = job_kwargs(origin, force)
        while True:
            queue, redis_id, data = encode_message(
                QUEUES[priority], actor_name(priority), (user_id, job_id), delay_ms, kwargs
            )
            reply = await self._redis.evalsha_or_eval(
                _SCHEDULE,
                [
                    keys.pending_job(user_id),
                    keys.queue_list(queue),
                    keys.queue_list(queue) + ".msgs",
                ],
                [
                    job_id,
                    PRIORITY_RANK[priority],
                    priority,
                    delay_ms,
                    redis_id,
                    data,
                    delay_ms + 3_600_000,
                    1 if force else 0,
                ],
            )
            if reply[0] != 2:
                break
            # A higher priority in the same millisecond as the pending job: two jobs must not
            # share an id (finishing one would clear the other's pending mark).
            job_id = _next_job_id(job_id)
        created, got_id, got_priority, got_delay = reply
        return Scheduled(
            jobId=got_id.decode(),
            userId=user_id,
            priority=got_priority.decode(),
            delay=int(got_delay),
            deduplicated=not created,
        )

    async def requeue(
        self,
        user_id: str,
        job_id: str,
        priority: str,
        attempt: int,
        delay_ms: int,
        *,
        origin: str = "schedule",
        force: bool = False,
    ) -> None:
        """Enqueue the next attempt of a job that failed in a retryable way (no dedup check)."""
        queue, redis_id, data = encode_message(
            QUEUES[priority],
            actor_name(priority),
            (user_id, job_id, attempt),
            delay_ms,
            job_kwargs(origin, force),
        )
        await self._push(queue, redis_id, data)

    async def _push(
        self, queue: str, redis_id: str, data: bytes, fence: Fence | None = None
    ) -> bool:
        """Write a message as Dramatiq's enqueue does: its body, then its id on the queue.

        With a `fence`, nothing is written unless the fence key holds its value, in the same
        atomic step; returns whether the message was written.
        """
        fence_keys = [fence.key] if fence is not None else []
        fence_args = [fence.value] if fence is not None else []
        written = await self._redis.evalsha_or_eval(
            _PUSH,
            [keys.queue_list(queue), keys.queue_list(queue) + ".msgs", *fence_keys],
            [redis_id, data, *fence_args],
        )
        return bool(written == 1)

    async def schedule_batch(
        self,
        user_ids: list[str],
        priority: str,
        *,
        origin: str = "schedule",
        force: bool = False,
        fence: Fence | None = None,
    ) -> str | None:
        """Enqueue one message that prefetches many users (strategies use it).

        Returns the batch id, or None when `fence` refused the enqueue (a stale leader).
        """
        batch_id = f"batch:{uuid.uuid4()}"
        queue, redis_id, data = encode_message(
            QUEUES[priority],
            actor_name(priority, batch=True),
            (user_ids, batch_id),
            0,
            job_kwargs(origin, force),
        )
        return batch_id if await self._push(queue, redis_id, data, fence) else None

    async def stats(self) -> dict[str, Any]:
        """The queue's counts, read in one pipeline."""
        commands: list[tuple[Any, ...]] = []
        for queue in QUEUES.values():
            name = keys.queue_list(queue)
            commands += [("LLEN", name), ("HLEN", name + ".msgs"), ("HLEN", name + ".DQ.msgs")]
        commands += [("GET", keys.JOBS_COMPLETED), ("GET", keys.JOBS_FAILED)]
        replies = await self._redis.pipeline(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        by_priority: dict[str, dict[str, int]] = {}
        for i, priority in enumerate(QUEUES):
            waiting, unacked, delayed = (int(r) for r in replies[3 * i : 3 * i + 3])
            by_priority[priority] = {
                "waiting": waiting,
                "active": max(0, unacked - waiting),
                "delayed": delayed,
            }
        return {
            "name": "prefetch",
            "waiting": sum(p["waiting"] for p in by_priority.values()),
            "active": sum(p["active"] for p in by_priority.values()),
            "completed": int(replies[-2] or 0),
            "failed": int(replies[-1] or 0),
            "delayed": sum(p["delayed"] for p in by_priority.values()),
            "byPriority": by_priority,
        }

    async def complete(self, user_id: str, job_id: str) -> None:
        """A job finished well: clear its pending mark, count it."""
        await self._redis.evalsha_or_eval(
            _FINISH, [keys.pending_job(user_id), keys.JOBS_COMPLETED], [job_id]
        )

    async def count_completed(self, count: int) -> None:
        """Count users of a batch message that finished well (they have no pending mark)."""
        if count:
            await self._redis.execute("INCRBY", keys.JOBS_COMPLETED, count)

    async def fail(self, job: wire.FailedJob) -> None:
        """A job failed for good: clear its pending mark, count it, keep it in the failed list.

        One script, so that the count and the list never disagree (the list used to be written
        in a second round trip, whose errors were not even checked).
        """
        await self._redis.evalsha_or_eval(
            _FAIL,
            [keys.pending_job(job.userId), keys.JOBS_FAILED, keys.FAILED_JOBS],
            [job.id, wire.json_encoder.encode(job), FAILED_KEEP],
        )

    async def failed(self, limit: int) -> list[wire.FailedJob]:
        """The newest `limit` failed jobs."""
        raw = await self._redis.execute("LRANGE", keys.FAILED_JOBS, 0, limit - 1)
        return [wire.failed_job_decoder.decode(item) for item in raw]

    async def retry(self, job_id: str) -> Scheduled:
        """Enqueue a failed job again under its id; NotFound / Conflict otherwise."""
        match = JOB_ID.match(job_id)
        if match is None:
            raise NotFound(f"No job {job_id}", code="JOB_NOT_FOUND")
        user_id = match.group(1)
        for raw in await self._redis.execute("LRANGE", keys.FAILED_JOBS, 0, -1):
            job = wire.failed_job_decoder.decode(raw)
            if job.id != job_id:
                continue
            # LREM decides between concurrent retries of one job: only one removes it.
            if await self._redis.execute("LREM", keys.FAILED_JOBS, 1, raw) == 1:
                # A pending job of equal or higher priority already covers the user.
                return await self.schedule(user_id, job.priority, 0, job_id=job_id)
            break
        pending = await self._redis.execute("HGET", keys.pending_job(user_id), "jobId")
        if pending is not None and pending.decode() == job_id:
            raise Conflict(f"Job {job_id} has not failed", code="JOB_NOT_FAILED")
        raise NotFound(f"No job {job_id}", code="JOB_NOT_FOUND")

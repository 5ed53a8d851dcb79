"""The job queue as the API and the actors see it: schedule, dedup, stats, failures, retry.

Messages are Dramatiq messages, built by Dramatiq's own `broker.enqueue` (one queue per
priority); scheduling writes them with our own script (engine/broker/dramatiq_layout.py) so
that the one-pending-job-per-user check and the enqueue are one atomic step (and one round
trip) instead of three. A user's pending mark names the message of the job's current attempt,
and counts only while that message exists.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dramatiq

from engine import tracing, wire
from engine.broker import dramatiq_layout as layout
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


_FAIL = Script.load(__file__, "fail.lua")


def job_message(
    priority: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, batch: bool = False
) -> dramatiq.Message[Any]:
    """The Dramatiq message of a prefetch job, before the broker gives it an id.

    With tracing on, its options carry the current span's context (the job continues it).
    """
    return dramatiq.Message(
        queue_name=QUEUES[priority],
        actor_name=actor_name(priority, batch=batch),
        args=args,
        kwargs=kwargs,
        options=tracing.message_options(),
    )


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The `data` of POST /api/prefetch/schedule/{userId}."""

    jobId: str
    userId: str
    priority: str
    delay: int
    deduplicated: bool


def scheduled_from_reply(user_id: str, reply: list[Any]) -> Scheduled:
    """The `Scheduled` of a schedule script's final reply (created, id, priority, delay),
    one reading for both brokers (schedule.lua, rabbit_mark.lua): created is 1 for a new
    job, 0 for the pending one it was deduplicated into, 3 if a concurrent retry took the
    failed record (raised as _RetryLost). 2 (same id, retry with the next) never gets here.
    """
    created, got_id, got_priority, got_delay = reply
    if created == 3:
        raise _RetryLost()
    return Scheduled(
        jobId=got_id.decode(),
        userId=user_id,
        priority=got_priority.decode(),
        delay=int(got_delay),
        deduplicated=not created,
    )


class JobQueue:
    """Queue operations over the queue DB; safe to share between coroutines of a process."""

    def __init__(self, redis: FastRedis, broker: dramatiq.Broker | None = None) -> None:
        self._redis = redis
        self._broker = broker or layout.encoder_broker()

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
        attributes = {"prefetch.user_id": user_id, "prefetch.origin": origin}
        with tracing.span(f"schedule {priority}", "producer", attributes):
            return await self._schedule(user_id, priority, delay_ms, job_id, origin, force, None)

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
        retry_keys = [keys.FAILED_JOBS] if failed_record is not None else []
        retry_args = [failed_record] if failed_record is not None else []
        while True:
            message = layout.encode(
                self._broker, job_message(priority, (user_id, job_id), kwargs), delay_ms
            )
            reply = await self._redis.evalsha_or_eval(
                layout.SCHEDULE,
                [
                    keys.pending_job(user_id),
                    layout.queue_key(message.queue),
                    layout.messages_key(message.queue),
                    *retry_keys,
                ],
                [
                    job_id,
                    PRIORITY_RANK[priority],
                    priority,
                    delay_ms,
                    message.redis_id,
                    message.data,
                    delay_ms + 3_600_000,
                    layout.NAMESPACE,
                    QUEUES[priority],
                    1 if force else 0,
                    *retry_args,
                ],
            )
            if reply[0] != 2:
                break
            # A higher priority in the same millisecond as the pending job: two jobs must not
            # share an id (finishing one would clear the other's pending mark).
            job_id = _next_job_id(job_id)
        return scheduled_from_reply(user_id, reply)

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
        attributes = {"prefetch.batch.users": len(user_ids), "prefetch.origin": origin}
        with tracing.span(f"schedule batch {priority}", "producer", attributes):
            message = layout.encode(
                self._broker,
                job_message(priority, (user_ids, batch_id), job_kwargs(origin, force), batch=True),
            )
            fenced = (fence.key, fence.value) if fence is not None else None
            return batch_id if await layout.push(self._redis, message, fenced) else None

    async def stats(self) -> dict[str, Any]:
        """The queue's counts, read in one pipeline.

        `dead` counts the messages in Dramatiq's dead-letter queues (kept 7 days); each of them
        also has its record in the failed list while it is among the newest 50.
        """
        queues = list(QUEUES.values())
        commands = layout.stats_commands(queues)
        commands += [("GET", keys.JOBS_COMPLETED), ("GET", keys.JOBS_FAILED)]
        replies = await self._redis.pipeline(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        by_priority: dict[str, dict[str, int]] = {}
        for i, priority in enumerate(QUEUES):
            waiting, messages, delayed, dead = (int(r) for r in replies[4 * i : 4 * i + 4])
            by_priority[priority] = {
                "waiting": waiting,
                "active": max(0, messages - waiting),
                "delayed": delayed,
                "dead": dead,
            }
        return {
            "name": "prefetch",
            "waiting": sum(p["waiting"] for p in by_priority.values()),
            "active": sum(p["active"] for p in by_priority.values()),
            "completed": int(replies[-2] or 0),
            "failed": int(replies[-1] or 0),
            "delayed": sum(p["delayed"] for p in by_priority.values()),
            "dead": sum(p["dead"] for p in by_priority.values()),
            "byPriority": by_priority,
        }

    async def close(self) -> None:
        """Release what the queue holds besides its Redis client (nothing, on Redis)."""

    async def fail(self, job: wire.FailedJob) -> None:
        """Record a job as failed for good without a message of its own (tests, tools): clear
        its pending mark, count it, keep it in the failed list, in one step."""
        await self._redis.evalsha_or_eval(
            _FAIL,
            [keys.pending_job(job.userId), keys.JOBS_FAILED, keys.FAILED_JOBS],
            [job.id, wire.json_encoder.encode(job), FAILED_KEEP],
        )

    async def failed(self, limit: int) -> list[wire.FailedJob]:
        """The newest `limit` failed jobs, newest first.

        The list is in the order the outcomes were written; two workers may write theirs in
        the other order than their jobs failed (by a few ms), so the few kept are sorted.
        """
        raw = await self._redis.execute("LRANGE", keys.FAILED_JOBS, 0, -1)
        jobs = [wire.failed_job_decoder.decode(item) for item in raw]
        jobs.sort(key=lambda job: job.timestamp, reverse=True)
        return jobs[:limit]

    async def retry(self, job_id: str) -> Scheduled:
        """Enqueue a failed job again under its id; NotFound / Conflict otherwise.

        Taking the record out of the failed list and scheduling are one atomic step: a crash
        between the two can neither lose the job nor schedule it twice.
        """
        match = JOB_ID.match(job_id)
        if match is None:
            raise NotFound(f"No job {job_id}", code="JOB_NOT_FOUND")
        user_id = match.group(1)
        for raw in await self._redis.execute("LRANGE", keys.FAILED_JOBS, 0, -1):
            job = wire.failed_job_decoder.decode(raw)
            if job.id != job_id:
                continue
            try:
                # A pending job of equal or higher priority already covers the user.
                return await self._schedule(
                    user_id, job.priority, 0, job_id, "schedule", False, raw
                )
            except _RetryLost:
                break  # a concurrent retry took it
        pending = await self._redis.execute("HGET", keys.pending_job(user_id), "jobId")
        if pending is not None and pending.decode() == job_id:
            raise Conflict(f"Job {job_id} has not failed", code="JOB_NOT_FAILED")
        raise NotFound(f"No job {job_id}", code="JOB_NOT_FOUND")


class _RetryLost(Exception):
    """The failed record was taken by a concurrent retry."""

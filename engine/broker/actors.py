"""The Dramatiq actors: one per priority for a single user, one per priority for a batch.

Upstream failures are handled here, not by Dramatiq's Retries middleware: a retryable one
enqueues the next attempt with an exact delay (2 s, then 4 s; Dramatiq's own backoff adds
jitter), a final or non-retryable one goes to our failed list with its real reason. Only
unexpected errors (Redis down mid-job) reach Dramatiq's Retries, so no job is ever dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import dramatiq

from engine import wire
from engine.broker.jobs import ACTOR_PRIORITY, QUEUES, actor_name
from engine.errors import UpstreamError
from engine.prefetcher import PrefetchResult
from engine.runtime import Runtime

# Longer than any attempt can take (PREFETCH_TIMEOUT is at most 10 min); a batch of 1000 too.
TIME_LIMIT_MS = 15 * 60 * 1000


class RuntimeHolder:
    """The process's Runtime, set by RuntimeMiddleware once the worker has booted."""

    runtime: Runtime | None = None

    def get(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError("worker runtime is not open")
        return self.runtime


def backoff_ms(runtime: Runtime, attempt: int) -> int:
    """Delay before attempt `attempt + 1`: PREFETCH_BACKOFF_MS, doubling each time."""
    return int(runtime.settings.prefetch_backoff_ms * 2 ** (attempt - 1))


async def run_job(
    runtime: Runtime,
    priority: str,
    user_id: str,
    job_id: str,
    attempt: int = 1,
    *,
    origin: str = "schedule",
    force: bool = False,
) -> None:
    """One attempt of one user's prefetch; acknowledged by Dramatiq when this returns."""
    started = time.perf_counter()
    try:
        await runtime.prefetcher.prefetch(user_id, priority, force=force, origin=origin)
    except UpstreamError as exc:
        await settle_failure(
            runtime, priority, user_id, job_id, attempt, exc, started, origin=origin, force=force
        )
        return
    runtime.prefetcher.record(True, started, origin)
    await runtime.jobs.complete(user_id, job_id)


async def settle_failure(
    runtime: Runtime,
    priority: str,
    user_id: str,
    job_id: str,
    attempt: int,
    exc: UpstreamError,
    started: float,
    *,
    origin: str,
    force: bool,
) -> None:
    """Schedule the next attempt, or record the job as failed for good."""
    if exc.retryable and attempt < runtime.settings.prefetch_max_attempts:
        delay = backoff_ms(runtime, attempt)
        await runtime.jobs.requeue(
            user_id, job_id, priority, attempt + 1, delay, origin=origin, force=force
        )
        return
    runtime.prefetcher.record(False, started, origin)
    await runtime.jobs.fail(
        wire.FailedJob(
            id=job_id,
            userId=user_id,
            priority=priority,
            failedReason=str(exc),
            attempts=attempt,
            timestamp=int(time.time() * 1000),
        )
    )


async def run_batch(
    runtime: Runtime,
    priority: str,
    user_ids: list[str],
    batch_id: str,
    *,
    origin: str = "schedule",
    force: bool = False,
) -> None:
    """Prefetch many users under one message; each failure is settled as its own job."""
    started = time.perf_counter()

    async def one(user_id: str) -> PrefetchResult:
        async with runtime.batch_slots:
            return await runtime.prefetcher.prefetch(user_id, priority, force=force, origin=origin)

    outcomes = await asyncio.gather(*(one(user_id) for user_id in user_ids), return_exceptions=True)
    unexpected: list[BaseException] = []
    millis = int(time.time() * 1000)
    done = 0
    for user_id, outcome in zip(user_ids, outcomes, strict=True):
        if isinstance(outcome, UpstreamError):
            job_id = f"prefetch:{user_id}:{millis}"
            await settle_failure(
                runtime, priority, user_id, job_id, 1, outcome, started, origin=origin, force=force
            )
        elif isinstance(outcome, BaseException):
            unexpected.append(outcome)
        else:
            done += 1
            runtime.prefetcher.record(True, started, origin)
    await runtime.jobs.count_completed(done)
    if unexpected:
        # Redis went away mid-batch: let Dramatiq retry the message (done users are no-ops
        # for hot, cheap refreshes for warm).
        raise unexpected[0]


def register_actors(broker: dramatiq.Broker, holder: RuntimeHolder) -> None:
    """Declare the six actors (and so their queues) on `broker`."""
    for priority, queue in QUEUES.items():
        dramatiq.Actor(
            _bind(holder, run_job, priority),  # type: ignore[arg-type]
            broker=broker,
            actor_name=actor_name(priority),
            queue_name=queue,
            priority=ACTOR_PRIORITY[priority],
            options={"time_limit": TIME_LIMIT_MS},
        )
        dramatiq.Actor(
            _bind(holder, run_batch, priority),  # type: ignore[arg-type]
            broker=broker,
            actor_name=actor_name(priority, batch=True),
            queue_name=queue,
            priority=ACTOR_PRIORITY[priority],
            options={"time_limit": TIME_LIMIT_MS},
        )


def _bind(
    holder: RuntimeHolder, fn: Callable[..., Awaitable[None]], priority: str
) -> Callable[..., Awaitable[None]]:
    async def actor(*args: Any, **kwargs: Any) -> None:
        await fn(holder.get(), priority, *args, **kwargs)

    actor.__name__ = f"{fn.__name__}_{priority}"
    actor.__qualname__ = actor.__name__
    return actor

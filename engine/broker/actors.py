"""The Dramatiq actors (one per priority for a single user, one per priority for a batch) and
the middleware that turns a job's end into its outcome.

Failures go through Dramatiq's own machinery: a retryable upstream failure raises
`dramatiq.Retry` with an exact delay (PREFETCH_BACKOFF_MS, doubling: 2 s, then 4 s), and the
Retries middleware enqueues the next attempt until PREFETCH_MAX_ATTEMPTS; any other upstream
failure is in the actors' `throws` and fails at once. `JobOutcome` then records the end in the
job's ledger: completion, the pending mark following a retry, or a failed-list record (the
message itself goes to Dramatiq's dead-letter queue). The executor writes all of it with the
message's acknowledgement, in one atomic step (engine/broker/executor.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import dramatiq
from dramatiq.common import q_name
from dramatiq.middleware import CurrentMessage

from engine import logs, tracing, wire
from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import ACTOR_PRIORITY, QUEUES, actor_name, job_kwargs
from engine.errors import JobDeadlineExceeded, UpstreamError
from engine.prefetcher import PrefetchResult
from engine.runtime import Runtime
from engine.store import keys

Handler = Callable[..., Awaitable[Any]]


class RuntimeHolder:
    """The process's Runtime (and broker), set once the worker has opened them."""

    runtime: Runtime | None = None
    broker: dramatiq.Broker | None = None

    def get(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError("worker runtime is not open")
        return self.runtime


def backoff_ms(runtime: Runtime, attempt: int) -> int:
    """Delay before attempt `attempt + 1`: PREFETCH_BACKOFF_MS, doubling each time."""
    return int(runtime.settings.prefetch_backoff_ms * 2 ** (attempt - 1))


def current_attempt() -> int:
    """1 for a job's first run, 2 for its first retry, ... (Dramatiq counts the retries)."""
    message = CurrentMessage.get_current_message()
    return int(message.options.get("retries", 0)) + 1 if message is not None else 1


async def prefetch_within_deadline(
    runtime: Runtime, user_id: str, priority: str, *, force: bool, origin: str
) -> PrefetchResult:
    """One user's prefetch, bounded by the job deadline (PREFETCH_JOB_DEADLINE).

    Dramatiq's TimeLimit went away with its worker threads: without this, a job would be
    bounded only by the upstream's and Redis's own timeouts, and a hang anywhere else would
    hold a slot of PREFETCH_JOB_CONCURRENCY for good. Past the deadline the prefetch is
    cancelled and fails as a timeout: retried like one, then failed-listed.
    """
    deadline = runtime.settings.job_deadline_s
    bound = asyncio.timeout(deadline)
    try:
        async with bound:
            return await runtime.prefetcher.prefetch(user_id, priority, force=force, origin=origin)
    except TimeoutError:
        if bound.expired():
            raise JobDeadlineExceeded(
                f"Job deadline of {deadline * 1000:.0f} ms exceeded"
            ) from None
        raise


def record_when_settled(runtime: Runtime, ok: bool, started: float, origin: str) -> None:
    """Count a job's outcome in this process's stats once the executor has written it to Redis,
    and only if this delivery was the one settled: an attempt that runs again after a Redis
    failure, or a message redelivered to another worker, is counted once, as Redis counts it.
    """
    elapsed = time.perf_counter() - started
    count = partial(runtime.prefetcher.count, ok, elapsed, origin)
    try:
        layout.current_ledger().on_settled.append(count)
    except RuntimeError:  # called outside the executor (a direct call): nothing to wait for
        count()


async def run_job(
    runtime: Runtime,
    priority: str,
    user_id: str,
    job_id: str,
    *_legacy: Any,
    origin: str = "schedule",
    force: bool = False,
) -> None:
    """One attempt of one user's prefetch."""
    logs.JOB_ID.set(job_id)  # on every line this attempt logs (the executor's too)
    logs.USER_ID.set(user_id)
    started = time.perf_counter()
    try:
        await prefetch_within_deadline(runtime, user_id, priority, force=force, origin=origin)
    except UpstreamError as exc:
        if exc.retryable:
            raise dramatiq.Retry(str(exc), delay=backoff_ms(runtime, current_attempt())) from exc
        raise  # in the actor's `throws`: fails at once
    record_when_settled(runtime, True, started, origin)


async def run_batch(
    runtime: Runtime,
    broker: dramatiq.Broker,
    priority: str,
    user_ids: list[str],
    batch_id: str,
    *,
    origin: str = "schedule",
    force: bool = False,
) -> int:
    """Prefetch many users under one message; each failure is settled as its own job.

    Returns how many users finished well (counted when the message is acknowledged).
    """
    logs.JOB_ID.set(batch_id)
    started = time.perf_counter()

    slots = runtime.batch_slots

    async def one(user_id: str) -> PrefetchResult:
        logs.USER_ID.set(user_id)  # this user's task only (each task has a context copy)
        # The slot was taken for it: the deadline starts now.
        return await prefetch_within_deadline(
            runtime, user_id, priority, force=force, origin=origin
        )

    def release(_: asyncio.Task[PrefetchResult]) -> None:
        slots.release()  # as a done callback: also for a task cancelled before it started

    # A user's task is made once a slot is free for it, not before: with 100 batches of 50
    # in flight, the 4,900 users without a slot are not 4,900 parked tasks (about 10 MB
    # and a wake-up each), just one waiting batch apiece; slots freed by one batch's users go
    # to whichever batch waits first.
    tasks: list[asyncio.Task[PrefetchResult]] = []
    try:
        for user_id in user_ids:
            await slots.acquire()
            task = asyncio.ensure_future(one(user_id))
            task.add_done_callback(release)
            tasks.append(task)
    except BaseException:  # cancelled while waiting for a slot (shutdown): stop the others
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, UpstreamError):
            # Redis failed mid-batch (the executor runs the message again later: nothing of
            # this run is written), or a bug (Dramatiq's Retries retries the message). Raised
            # before any user is settled, so that the next run settles each of them once.
            raise outcome
    ledger = layout.current_ledger()
    settings = runtime.settings
    millis = int(time.time() * 1000)
    done = 0
    for user_id, outcome in zip(user_ids, outcomes, strict=True):
        if isinstance(outcome, UpstreamError):
            job_id = f"prefetch:{user_id}:{millis}"
            if outcome.retryable and settings.prefetch_max_attempts > 1:
                # Its second attempt, as a job of its own (written with this message's ack).
                broker.actors[actor_name(priority)].send_with_options(
                    args=(user_id, job_id),
                    kwargs=job_kwargs(origin, force),
                    delay=backoff_ms(runtime, 1),
                    retries=1,
                    **tracing.message_options(),
                )
            else:
                record_when_settled(runtime, False, started, origin)
                ledger.failed(_record(job_id, user_id, priority, str(outcome), 1))
        else:
            done += 1
            record_when_settled(runtime, True, started, origin)
    return done


def _record(job_id: str, user_id: str, priority: str, reason: str, attempts: int) -> bytes:
    return wire.json_encoder.encode(
        wire.FailedJob(
            id=job_id,
            userId=user_id,
            priority=priority,
            failedReason=reason,
            attempts=attempts,
            timestamp=int(time.time() * 1000),
        )
    )


_started: contextvars.ContextVar[float] = contextvars.ContextVar("job_started", default=0.0)
_attempt: contextvars.ContextVar[int] = contextvars.ContextVar("job_attempt", default=1)


class JobOutcome(dramatiq.Middleware):
    """Records how a job ended in its ledger: completion, retry, or failure for good.

    Listed before Retries: `after_*` hooks run in reverse order, so this one sees Retries'
    decision (the retry message it enqueued, or the message failed).
    """

    def __init__(self, holder: RuntimeHolder) -> None:
        self._holder = holder

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _started.set(time.perf_counter())
        _attempt.set(int(message.options.get("retries", 0)) + 1)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        try:
            ledger = layout.current_ledger()
        except RuntimeError:
            return  # not run by the executor
        priority = q_name(message.queue_name)
        attempts = _attempt.get()
        if message.actor_name.startswith("prefetch_batch_"):
            if exception is None:
                ledger.completed(int(result or 0))
            elif message.failed:
                reason = str(exception)
                ledger.failed(_record(message.args[1], "", priority, reason, attempts))
            return
        user_id, job_id = message.args[0], message.args[1]
        pending = keys.pending_job(user_id)
        if exception is None:
            ledger.clear_pending(pending, job_id)
            ledger.completed(1)
        elif message.failed:
            ledger.clear_pending(pending, job_id)
            ledger.failed(_record(job_id, user_id, priority, str(exception), attempts))
            origin = message.kwargs.get("origin", "schedule")
            record_when_settled(self._holder.get(), False, _started.get(), origin)
        elif ledger.messages:
            ledger.move_pending(pending, job_id, ledger.messages[-1])


def register_actors(broker: dramatiq.Broker, holder: RuntimeHolder) -> dict[str, Handler]:
    """Declare the six actors (and so their queues) on `broker`; their coroutines by name."""
    handlers: dict[str, Handler] = {}
    options = {"throws": (UpstreamError,)}
    for priority, queue in QUEUES.items():
        for batch in (False, True):
            name = actor_name(priority, batch=batch)
            handler = _bind(holder, priority, batch=batch)
            dramatiq.Actor(
                handler,
                broker=broker,
                actor_name=name,
                queue_name=queue,
                priority=ACTOR_PRIORITY[priority],
                options=dict(options),
            )
            handlers[name] = handler
    return handlers


def _bind(holder: RuntimeHolder, priority: str, *, batch: bool) -> Handler:
    if batch:

        async def actor(*args: Any, **kwargs: Any) -> Any:
            assert holder.broker is not None
            return await run_batch(holder.get(), holder.broker, priority, *args, **kwargs)

        name = f"run_batch_{priority}"
    else:

        async def actor(*args: Any, **kwargs: Any) -> Any:
            return await run_job(holder.get(), priority, *args, **kwargs)

        name = f"run_job_{priority}"
    actor.__name__ = actor.__qualname__ = name
    return actor

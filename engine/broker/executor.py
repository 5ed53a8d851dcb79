"""Runs Dramatiq messages as coroutines on the worker's event loop, and settles them.

Dramatiq's consumer threads fetch messages into its in-memory priority work queue
(engine/broker/dramatiq_worker.py); the executor takes them from there onto the loop, at most
`concurrency` at once, the most urgent first whenever a slot frees. Each message goes through
the broker's middleware hooks (`before/after_process_message`: CurrentMessage, Retries, the
job outcome) and its actor's coroutine, inside a ledger: the messages that Dramatiq enqueues
meanwhile (a retry) and the outcome (completion, failed-list record) are not written then,
but together with the message's acknowledgement, in one atomic script call per batch of
finished messages (settle.lua). So a message is never acknowledged without its outcome, and
an outcome is never written twice for one delivery. What the job counts in this process's
stats waits in the ledger too (`on_settled`), and is counted only for a message that the
settle found still this worker's: the in-memory stats agree with the Redis counters. On
RabbitMQ the settler publishes, writes the outcomes, then acknowledges
(engine/broker/rabbit_settle.py): the same guarantees, in ordered steps instead of one.

When Redis fails (unreachable, or refusing writes: OOM, LOADING), nothing of the attempt is
written: the job runs again after a backoff, and a settle that fails is retried until Redis
takes it. The message stays in this worker's ack set meanwhile, so if the process dies it is
handed to another (by the supervisor, or Dramatiq's heartbeat maintenance).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from queue import Empty
from typing import Any, Protocol

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.errors import RateLimitExceeded, Retry
from dramatiq.middleware import SkipMessage

from engine import tracing
from engine.broker import dramatiq_layout as layout
from engine.broker.dramatiq_worker import LoopWorker
from engine.broker.ledger import Ledger, deferred
from engine.errors import BrokerUnavailable, RedisReplyError, RedisUnavailable
from engine.store.fastredis import Arg, FastRedis
from engine.throttle import LogThrottle

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]

# Replies that mean "Redis cannot take this now", not "this job is wrong".
TRANSIENT_REPLIES = ("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "MISCONF")
RERUN_BACKOFF_S = (0.5, 10.0)  # first and longest pause before running a job again
SETTLE_BACKOFF_S = (0.2, 5.0)
SETTLE_BATCH = 256  # messages per settle call
WARN_EVERY_S = 5.0


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says Redis could not serve us now (the job itself is fine)."""
    if isinstance(exc, RedisUnavailable):
        return True
    return isinstance(exc, RedisReplyError) and str(exc).startswith(TRANSIENT_REPLIES)


@dataclass(slots=True)
class Finished:
    """A message whose run is over, to be settled: its verb and what its run enqueued."""

    message: MessageProxy
    verb: str  # ack, nack, back
    ledger: Ledger | None
    published: bool = False  # RabbitMQ: its ledger's messages are confirmed already


class Settler(Protocol):
    """Writes finished messages' outcomes and acknowledges them, for one broker."""

    async def settle(self, batch: list[Finished]) -> list[bool]:
        """Settle the batch; per message, in order, whether this settle wrote its outcome (it
        was still this worker's, or its delivery's outcome was not written yet). Raise
        (RedisUnavailable, RedisReplyError, BrokerUnavailable) to have it tried again later,
        whole."""

    def may_be_settled(self, message: MessageProxy) -> bool:
        """Whether this delivery may repeat one whose outcome is already written."""

    async def is_settled(self, message: MessageProxy) -> bool:
        """Whether this delivery's outcome is already written (then it is only acknowledged)."""


class RedisSettler:
    """Dramatiq's Redis broker: outcomes and acks of a batch in one script call (settle.lua)."""

    def __init__(
        self,
        broker: layout.PrefetchBroker,
        worker: LoopWorker,
        redis: FastRedis,
        failed_keep: int,
    ) -> None:
        self._broker = broker
        self._worker = worker
        self._redis = redis
        self._failed_keep = failed_keep

    async def settle(self, batch: list[Finished]) -> list[bool]:
        groups: list[Arg] = []
        for done in batch:
            groups += layout.settle_group(
                done.verb,
                done.message.queue_name,
                done.message.options["redis_message_id"],
                done.ledger,
            )
        ours = await layout.settle(
            self._redis, str(self._broker.broker_id), groups, self._failed_keep
        )
        for done in batch:
            self._worker.settled(done.message)
        return ours

    def may_be_settled(self, message: MessageProxy) -> bool:
        return False  # the ack is written with the outcome: a redelivery never follows one

    async def is_settled(self, message: MessageProxy) -> bool:
        return False


class Executor:
    """Takes the work queue's messages onto this event loop and settles them."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        worker: LoopWorker,
        settler: Settler,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._broker = broker
        self._worker = worker
        self._backend = settler
        self._handlers = handlers
        self._free = concurrency
        self._accepting = True
        self._idle = False  # read by consumer threads: wake the loop on the next item
        self._wake_pending = False
        self._running: set[asyncio.Task[None]] = set()
        self._finished: list[Finished] = []
        self._held: set[str] = set()  # redis ids taken from the work queue, not yet settled
        self._settler: asyncio.Task[None] | None = None
        self._log = LogThrottle(log, WARN_EVERY_S)
        worker.work_queue.on_put = self._on_put

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def unsettled(self) -> int:
        return len(self._finished)

    def held_ids(self) -> set[str]:
        """Redis ids of the messages this executor runs or has yet to settle."""
        return set(self._held)

    # --- taking work ------------------------------------------------------------------------

    def _on_put(self) -> None:
        """An item arrived (from a consumer thread, or fetched on this loop): wake the loop if
        it is waiting for one."""
        if self._idle and not self._wake_pending:
            self._wake_pending = True
            if threading.get_ident() == self._thread:
                self._loop.call_soon(self._pump)
            else:
                self._loop.call_soon_threadsafe(self._pump)

    def start(self) -> None:
        """Take what is already waiting (and everything that arrives from now on)."""
        self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._wake_pending = False
        queue = self._worker.work_queue
        while self._free > 0 and self._accepting:
            try:
                item = queue.get_nowait()
            except Empty:
                self._idle = True
                try:  # an item put just before `_idle` was set did not wake us: look again
                    item = queue.get_nowait()
                except Empty:
                    return
            self._idle = False
            self._free -= 1
            redis_id = item.message.options.get("redis_message_id")
            if redis_id is not None:  # Redis broker: the reclaimer compares its ack sets
                self._held.add(redis_id)
            task = self._loop.create_task(self._run(item.message))
            self._running.add(task)
            task.add_done_callback(self._job_done)
        self._idle = False

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free += 1
        if not task.cancelled() and task.exception() is not None:
            log.error("job runner crashed", exc_info=task.exception())
        self._pump()

    # --- running one message ------------------------------------------------------------------

    async def _run(self, message: MessageProxy) -> None:
        pause = RERUN_BACKOFF_S[0]
        while True:
            # With tracing on, each attempt is a span continuing the message's schedule.
            with deferred() as ledger, tracing.job_span(message) as span:
                verb = await self._attempt(message, ledger)
                if span is not None:
                    span.set_attribute("prefetch.job.outcome", verb or "rerun")
            if verb is not None:
                self._finish(message, verb, ledger)
                return
            try:
                await asyncio.sleep(pause)
            except asyncio.CancelledError:
                self._finish(message, "back", None)  # shutting down: hand it back
                raise
            pause = min(pause * 2, RERUN_BACKOFF_S[1])

    async def _attempt(self, message: MessageProxy, ledger: Ledger) -> str | None:
        """Run the message once; its verb (ack, nack), or None to run it again later."""
        broker = self._broker
        handler = self._handlers.get(message.actor_name)
        try:
            if self._backend.may_be_settled(message) and await self._backend.is_settled(message):
                return "ack"  # its outcome is written: only the acknowledgement was lost
            broker.emit_before("process_message", message)
            if handler is None:
                raise dramatiq.ActorNotFound(message.actor_name)  # type: ignore[no-untyped-call]
            result = await handler(*message.args, **message.kwargs)
        except SkipMessage:
            broker.emit_after("skip_message", message)
            return "ack"
        except Exception as exc:
            if is_transient(exc):
                self._warn(f"Redis failed during {message}; it runs again later", exc)
                return None
            message.stuff_exception(exc)
            self._log_failure(message, exc)
            broker.emit_after("process_message", message, exception=exc)
            message.clear_exception()
            return "nack" if message.failed else "ack"
        broker.emit_after("process_message", message, result=result)
        return "ack"

    def _log_failure(self, message: MessageProxy, exc: Exception) -> None:
        """As Dramatiq's worker threads log it."""
        actor = self._broker.actors.get(message.actor_name)
        throws = message.options.get("throws") or (actor.options.get("throws") if actor else None)
        if isinstance(exc, Retry | RateLimitExceeded):
            return
        if throws and isinstance(exc, throws):
            log.info("Failed to process message %s with expected exception %r", message, exc)
        else:
            log.error(
                "Failed to process message %s with unhandled exception", message, exc_info=exc
            )

    def _warn(self, what: str, exc: BaseException) -> None:
        self._log.warning("redis", "%s: %r", what, exc)

    # --- settling -----------------------------------------------------------------------------

    def _finish(self, message: MessageProxy, verb: str, ledger: Ledger | None) -> None:
        self._finished.append(Finished(message, verb, ledger))
        if self._settler is None:
            self._settler = self._loop.create_task(self._settle_all())

    async def _settle_all(self) -> None:
        """Write the finished messages' outcomes and acks; retry until Redis takes them."""
        pause = SETTLE_BACKOFF_S[0]
        try:
            while self._finished:
                batch = self._finished[:SETTLE_BATCH]
                try:
                    ours = await self._backend.settle(batch)
                except (RedisUnavailable, RedisReplyError, BrokerUnavailable) as exc:
                    self._warn(f"could not settle {len(batch)} finished jobs yet", exc)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, SETTLE_BACKOFF_S[1])
                    continue
                pause = SETTLE_BACKOFF_S[0]
                del self._finished[: len(batch)]
                for done, mine in zip(batch, ours, strict=True):
                    redis_id = done.message.options.get("redis_message_id")
                    if redis_id is not None:
                        self._held.discard(redis_id)
                    if mine and done.ledger is not None:
                        _run_callbacks(done.ledger)
        finally:
            self._settler = None

    # --- stopping -----------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Take no new message; let the running ones finish and settle within `timeout_s`.

        Returns how many were still running at the deadline: they stay unacknowledged, and
        go back to the queue when this process exits.
        """
        self._accepting = False
        self._worker.work_queue.on_put = None
        deadline = self._loop.time() + timeout_s
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)
        stuck = len(self._running)
        for task in list(self._running):
            task.cancel()  # a job waiting to run again is handed back; others stay unacked
        if self._running:
            await asyncio.wait(set(self._running), timeout=1.0)
        settler = self._settler
        if settler is not None:
            remaining = max(1.0, deadline - self._loop.time())
            done, _ = await asyncio.wait({settler}, timeout=remaining)
            if not done:
                log.warning(
                    "%d finished jobs unsettled at shutdown: they run again", self.unsettled
                )
                settler.cancel()
        return stuck


def _run_callbacks(ledger: layout.Ledger) -> None:
    """What the job asked to do once its outcome was written (counting it in this process)."""
    for callback in ledger.on_settled:
        try:
            callback()
        except Exception:
            log.exception("a settled job's callback failed")

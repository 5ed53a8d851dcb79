"""Fetches the Redis broker's queues on the event loop, as Dramatiq's consumers do.

Dramatiq's consumer thread fetches a queue through redis-py in a thread of its own and hands
each message to the loop across threads. For the ready queues, which carry every job, that
cost a worker about a twentieth of its CPU at full load: the GIL's hand-offs between the
thread and the loop, redis-py's cost per call, and each idle thread's polls (tuning.md
"The ready queues fetched on the loop"). So the loop fetches them itself. One task per queue
calls Dramatiq's own dispatch.lua `fetch` through FastRedis (the script also beats this
worker's heartbeat and, now and then, runs Dramatiq's maintenance of dead workers' messages),
decodes the messages as Dramatiq does, and puts them on the priority work queue that the
executor takes from.

The delay queues (`Q.DQ`: retries, delayed schedules) are fetched the same way, up to their
own prefetch, and held here until their eta; then each moves to its queue under the same id in
one step (promote.lua), so that the user's pending mark keeps naming it. One timer serves
them all, and fires at the earliest eta rather than at the next poll.

As with Dramatiq's consumer, a queue has at most `prefetch` messages fetched and not yet
settled (or promoted). A full queue waits until half of that is freed, or a poll period
passes. An empty queue is polled at Dramatiq's backoff (without its jitter), growing to
`poll_ms`, which bounds how late a new job is seen; the polls of idle queues fall on the same
instants, so that they share a wake-up and a write. A message for an actor this worker does
not have is dead-lettered with a failed-list record, as Dramatiq's consumer does. Messages on
a ready queue carry no eta (Dramatiq and promote.lua put delayed ones on the delay queue), so
none is held back there.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Iterator

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff, current_millis, dq_name, iter_queue

from engine.broker import dramatiq_layout as layout
from engine.broker.dramatiq_worker import WorkItem, WorkQueue
from engine.broker.jobs import FAILED_KEEP
from engine.errors import RedisReplyError, RedisUnavailable
from engine.store.fastredis import Arg, FastRedis
from engine.throttle import LogThrottle

log = logging.getLogger(__name__)

RETRY_S = 1.0  # after a failed fetch, as Dramatiq restarts a consumer after a connection error
WARN_EVERY_S = 5.0
FETCH_GRACE_S = 2.0  # how long close() waits for a fetch in flight


async def _sleep_to_next(step_s: float) -> None:
    """Sleep until the loop clock's next multiple of `step_s`. Idle queues at the same backoff
    wake in the same loop turn, and their fetches go out in one write (FastRedis sends what a
    turn queued together) and come back in one read: at the longest backoff, one wake-up per
    poll period for every idle queue, instead of a wake-up and a round trip each."""
    now = asyncio.get_running_loop().time()
    await asyncio.sleep((math.floor(now / step_s) + 1) * step_s - now)


def is_delay_queue(queue: str) -> bool:
    return dq_name(queue) == queue


class LoopConsumer:
    """Fetches the queues it is given, on this event loop: a ready queue's messages onto the
    work queue, a delay queue's held until their eta and then moved to their queue."""

    def __init__(
        self,
        broker: layout.PrefetchBroker,
        redis: FastRedis,
        work_queue: WorkQueue,
        *,
        prefetch: int,
        delay_prefetch: int,
        poll_ms: int,
    ) -> None:
        self._broker = broker
        self._redis = redis
        self._work_queue = work_queue
        self._prefetch = prefetch
        self._delay_prefetch = delay_prefetch
        self._poll_ms = poll_ms
        self._unsettled: dict[str, set[str]] = {}  # per queue: redis ids fetched, not settled
        self._limit: dict[str, int] = {}  # per queue: its prefetch (delay queues: their own)
        self._room: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fetching: set[str] = set()  # queues whose fetch is awaiting its reply
        self._closing = False
        self._log = LogThrottle(log, WARN_EVERY_S)
        # Delayed messages held until their eta: by redis id, and a heap of (eta, n, redis id).
        self._delayed: dict[str, MessageProxy] = {}
        self._etas: list[tuple[int, int, str]] = []
        self._order = itertools.count()
        self._sooner = asyncio.Event()  # a message was held that is due before the timer fires
        self._promoter: asyncio.Task[None] | None = None

    def add(self, queue: str) -> None:
        """Start fetching `queue`, a ready or a delay queue (on the running loop)."""
        if queue in self._tasks:
            return
        self._unsettled[queue] = set()
        self._limit[queue] = self._delay_prefetch if is_delay_queue(queue) else self._prefetch
        self._room[queue] = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._consume(queue), name=f"consume {queue}")
        task.add_done_callback(self._ended)
        self._tasks[queue] = task
        if is_delay_queue(queue) and self._promoter is None:
            self._promoter = loop.create_task(self._promote_due(), name="promote delayed")
            self._promoter.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not self._closing and not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def settled(self, message: MessageProxy) -> None:
        """`message` is settled (or promoted): it no longer counts against its queue's prefetch."""
        queue = message.queue_name
        unsettled = self._unsettled.get(queue)
        if unsettled is None:
            return
        unsettled.discard(message.options["redis_message_id"])
        if len(unsettled) <= self._limit[queue] // 2:
            self._room[queue].set()

    def held_ids(self) -> set[str]:
        """Redis ids of the delayed messages held here until their eta (the reclaimer's)."""
        return set(self._delayed)

    def dead(self) -> list[str]:
        """Queues whose fetching task has ended without being closed (a bug: see `_consume`),
        and the promoting task, likewise."""
        if self._closing:
            return []
        dead = [queue for queue, task in self._tasks.items() if task.done()]
        if self._promoter is not None and self._promoter.done():
            dead.append("the delayed messages' promotion")
        return dead

    async def _consume(self, queue: str) -> None:
        unsettled = self._unsettled[queue]
        room = self._room[queue]
        limit = self._limit[queue]
        delayed = is_delay_queue(queue)
        misses = 0
        while not self._closing:
            free = limit - len(unsettled)
            if free <= 0:
                room.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel
                # that lands as the event fires, and close() would wait on this task forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_ms / 1000):
                        await room.wait()
                continue
            # A fetch is not cancelled (close() waits for it): its ids are in this worker's
            # ack set once the script has run, and only its reply says which.
            self._fetching.add(queue)
            try:
                fetched = await layout.fetch(self._redis, self._broker, queue, free)
            except (RedisUnavailable, RedisReplyError) as exc:
                # What a lost reply held stays in the ack set: the reclaimer hands it back
                # (engine/broker/reclaim.py).
                self._warn(f"could not fetch from {queue}", exc)
                fetched = None
            finally:
                self._fetching.discard(queue)
            if fetched is None:
                await asyncio.sleep(RETRY_S)
                continue
            if not fetched:
                misses, backoff_ms = compute_backoff(
                    misses, jitter=False, max_backoff=self._poll_ms
                )
                await _sleep_to_next(backoff_ms / 1000)
                continue
            misses = 0
            if delayed:
                self._hold(fetched, unsettled)
                continue
            rejected = self._hand_over(fetched, unsettled)
            if rejected:
                await self._reject(rejected)

    def _decoded(self, fetched: list[bytes | None], unsettled: set[str]) -> Iterator[MessageProxy]:
        """The fetched messages, decoded as Dramatiq does, each counted as unsettled."""
        for data in fetched:
            if data is None:  # its id was queued without its data: Dramatiq skips it too
                log.warning("a fetched message had no data; skipped")
                continue
            try:
                message = MessageProxy(dramatiq.Message.decode(data))
            except dramatiq.errors.DecodeError as exc:
                # Still in this worker's ack set: the reclaimer hands it back, and it shows
                # here again, until someone deletes it.
                log.error("could not decode a fetched message: %r", exc)
                continue
            unsettled.add(message.options["redis_message_id"])
            yield message

    def _hand_over(self, fetched: list[bytes | None], unsettled: set[str]) -> list[MessageProxy]:
        """Put the fetched messages on the work queue; those of unknown actors are returned."""
        actors = self._broker.actors
        put = self._work_queue.put
        rejected: list[MessageProxy] = []
        for message in self._decoded(fetched, unsettled):
            actor = actors.get(message.actor_name)
            if actor is None:
                rejected.append(message)
            else:
                put(WorkItem(actor.priority, message))
        return rejected

    # --- delayed messages ---------------------------------------------------------------------

    def _hold(self, fetched: list[bytes | None], unsettled: set[str]) -> None:
        """Hold fetched delayed messages until their eta. (As Dramatiq's consumer thread, an
        unknown actor is not looked up here: its ready copy is rejected once promoted.)"""
        earliest = self._etas[0][0] if self._etas else None
        for message in self._decoded(fetched, unsettled):
            redis_id = message.options["redis_message_id"]
            eta = int(message.options.get("eta") or 0)
            self._delayed[redis_id] = message
            heapq.heappush(self._etas, (eta, next(self._order), redis_id))
        if earliest is None or (self._etas and self._etas[0][0] < earliest):
            self._sooner.set()

    async def _promote_due(self) -> None:
        """Move each held message to its queue once its eta has passed; sleep until the next
        eta, or until a message due sooner is held."""
        while not self._closing:
            now = current_millis()
            due: list[str] = []
            while self._etas and self._etas[0][0] <= now:
                due.append(heapq.heappop(self._etas)[2])
            if due:
                if not await self._promote(due):
                    await asyncio.sleep(RETRY_S)
                continue
            self._sooner.clear()
            wait_s = (self._etas[0][0] - now) / 1000 if self._etas else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._sooner.wait()

    async def _promote(self, redis_ids: list[str]) -> bool:
        """Promote these held messages (one pipelined round trip); those Redis refused stay
        held, due at once. Returns whether all were taken."""
        broker_id = str(self._broker.broker_id)
        outcomes = await asyncio.gather(
            *(layout.promote(self._redis, broker_id, self._delayed[rid]) for rid in redis_ids),
            return_exceptions=True,
        )
        failed: BaseException | None = None
        for redis_id, outcome in zip(redis_ids, outcomes, strict=True):
            if isinstance(outcome, RedisUnavailable | RedisReplyError):
                failed = outcome
                heapq.heappush(self._etas, (0, next(self._order), redis_id))
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            # Promoted, or no longer ours (Dramatiq's maintenance handed it back): let go.
            self.settled(self._delayed.pop(redis_id))
        if failed is not None:
            what = f"could not move {len(redis_ids)} delayed messages to their queues"
            self._warn(what, failed, kind="promote")
        return failed is None

    async def _reject(self, messages: list[MessageProxy]) -> None:
        """Dead-letter messages for actors this worker does not have, each with a record."""
        groups: list[Arg] = []
        for message in messages:
            log.error("received a message for the undefined actor %r", message.actor_name)
            missing = dramatiq.ActorNotFound(message.actor_name)  # type: ignore[no-untyped-call]
            groups += layout.rejection_group(message, missing)
        try:
            await layout.settle(self._redis, str(self._broker.broker_id), groups, FAILED_KEEP)
        except (RedisUnavailable, RedisReplyError) as exc:
            self._warn("could not dead-letter messages of unknown actors", exc)
        for message in messages:  # settled, or handed back by the reclaimer to try again
            self.settled(message)

    def _warn(self, what: str, exc: BaseException, kind: str = "redis") -> None:
        self._log.warning(kind, "%s: %r", what, exc)

    async def close(self) -> None:
        """Stop fetching, and hand back to their queues the messages fetched and not started
        (in the work queue) and the delayed ones held. What cannot be handed back now stays in
        this worker's ack sets, which the supervisor requeues when the process has exited."""
        self._closing = True
        for queue, task in self._tasks.items():
            if queue not in self._fetching:
                task.cancel()  # waiting for room, or polling; a fetch ends by itself
        if self._promoter is not None:
            # A promotion cut short leaves its messages held: handed back below, which moves
            # only those still in the ack set (promote.lua took the others out of it).
            self._promoter.cancel()
        tasks = [*self._tasks.values(), *([self._promoter] if self._promoter else [])]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=FETCH_GRACE_S)
            for task in late:  # a fetch from a Redis that hangs: its ids stay in the ack set
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Everything in the work queue was fetched here: on Redis this is the only fetcher.
        waiting: list[WorkItem] = list(iter_queue(self._work_queue))  # type: ignore[no-untyped-call]
        back = [*self._delayed.values(), *(item.message for item in waiting)]
        if not back:
            return
        groups: list[Arg] = []
        for message in back:
            redis_id = message.options["redis_message_id"]
            groups += layout.settle_group("back", message.queue_name, redis_id, None)
        try:
            await layout.settle(self._redis, str(self._broker.broker_id), groups, FAILED_KEEP)
        except (RedisUnavailable, RedisReplyError) as exc:
            log.warning("could not hand back %d fetched messages: %r", len(back), exc)
            return
        self._delayed.clear()
        self._etas.clear()

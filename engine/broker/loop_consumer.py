"""Fetches the Redis broker's ready queues on the event loop, as Dramatiq's consumers do.

Dramatiq's consumer thread fetches a queue through redis-py in a thread of its own and hands
each message to the loop across threads. For the ready queues, which carry every job, that
cost a worker about a twentieth of its CPU at full load: the GIL's hand-offs between the
thread and the loop, redis-py's cost per call, and each idle thread's polls (tuning.md
"The ready queues fetched on the loop"). So the loop fetches them itself. One task per queue
calls Dramatiq's own dispatch.lua `fetch` through FastRedis (the script also beats this
worker's heartbeat and, now and then, runs Dramatiq's maintenance of dead workers' messages),
decodes the messages as Dramatiq does, and puts them on the priority work queue that the
executor takes from. The delay queues keep Dramatiq's consumer threads, which hold each
message until its eta and then promote it (engine/broker/dramatiq_worker.py).

As with Dramatiq's consumer, a queue has at most `prefetch` messages fetched and not yet
settled. A full queue waits until settles free half of that, or a poll period passes. An
empty queue is polled at Dramatiq's backoff, growing to `poll_ms`, which bounds how late a
new job is seen. A message for an actor this worker does not have is dead-lettered with a
failed-list record, as Dramatiq's consumer does. Messages on a ready queue carry no eta
(Dramatiq and promote.lua put delayed ones on the delay queue), so none is held back here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff, iter_queue

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


class LoopConsumer:
    """Fetches the ready queues it is given onto the work queue, on this event loop."""

    def __init__(
        self,
        broker: layout.PrefetchBroker,
        redis: FastRedis,
        work_queue: WorkQueue,
        *,
        prefetch: int,
        poll_ms: int,
    ) -> None:
        self._broker = broker
        self._redis = redis
        self._work_queue = work_queue
        self._prefetch = prefetch
        self._low_water = prefetch // 2
        self._poll_ms = poll_ms
        self._unsettled: dict[str, set[str]] = {}  # per queue: redis ids fetched, not settled
        self._room: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fetching: set[str] = set()  # queues whose fetch is awaiting its reply
        self._closing = False
        self._log = LogThrottle(log, WARN_EVERY_S)

    def owns(self, queue: str) -> bool:
        return queue in self._tasks

    def add(self, queue: str) -> None:
        """Start fetching `queue` (on the running loop)."""
        if queue in self._tasks:
            return
        self._unsettled[queue] = set()
        self._room[queue] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._consume(queue), name=f"consume {queue}")
        task.add_done_callback(self._ended)
        self._tasks[queue] = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not self._closing and not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def settled(self, message: MessageProxy) -> None:
        """`message` is settled: it no longer counts against its queue's prefetch."""
        queue = message.queue_name
        unsettled = self._unsettled.get(queue)
        if unsettled is None:
            return
        unsettled.discard(message.options["redis_message_id"])
        if len(unsettled) <= self._low_water:
            self._room[queue].set()

    def dead(self) -> list[str]:
        """Queues whose fetching task has ended without being closed (a bug: see `_consume`)."""
        if self._closing:
            return []
        return [queue for queue, task in self._tasks.items() if task.done()]

    async def _consume(self, queue: str) -> None:
        unsettled = self._unsettled[queue]
        room = self._room[queue]
        misses = 0
        while not self._closing:
            free = self._prefetch - len(unsettled)
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
                misses, backoff_ms = compute_backoff(misses, max_backoff=self._poll_ms)
                await asyncio.sleep(backoff_ms / 1000)
                continue
            misses = 0
            rejected = self._hand_over(fetched, unsettled)
            if rejected:
                await self._reject(rejected)

    def _hand_over(self, fetched: list[bytes | None], unsettled: set[str]) -> list[MessageProxy]:
        """Put the fetched messages on the work queue; those of unknown actors are returned."""
        actors = self._broker.actors
        put = self._work_queue.put
        rejected: list[MessageProxy] = []
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
            actor = actors.get(message.actor_name)
            if actor is None:
                rejected.append(message)
            else:
                put(WorkItem(actor.priority, message))
        return rejected

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

    def _warn(self, what: str, exc: BaseException) -> None:
        self._log.warning("redis", "%s: %r", what, exc)

    async def close(self) -> None:
        """Stop fetching, and hand back to their queues the messages fetched and not started
        (in the work queue). What cannot be handed back now stays in this worker's ack sets,
        which the supervisor requeues when the process has exited."""
        self._closing = True
        for queue, task in self._tasks.items():
            if queue not in self._fetching:
                task.cancel()  # waiting for room, or polling; a fetch ends by itself
        if self._tasks:
            _, late = await asyncio.wait(self._tasks.values(), timeout=FETCH_GRACE_S)
            for task in late:  # a fetch from a Redis that hangs: its ids stay in the ack set
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        waiting: list[WorkItem] = list(iter_queue(self._work_queue))  # type: ignore[no-untyped-call]
        groups: list[Arg] = []
        handed = 0
        for item in waiting:
            message = item.message
            if self.owns(message.queue_name):
                redis_id = message.options["redis_message_id"]
                groups += layout.settle_group("back", message.queue_name, redis_id, None)
                handed += 1
            else:
                self._work_queue.put(item)  # a delay queue consumer's: Dramatiq's stop
        if not handed:
            return
        try:
            await layout.settle(self._redis, str(self._broker.broker_id), groups, FAILED_KEEP)
        except (RedisUnavailable, RedisReplyError) as exc:
            log.warning("could not hand back %d fetched messages: %r", handed, exc)

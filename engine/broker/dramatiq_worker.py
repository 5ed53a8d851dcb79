"""The parts of Dramatiq's worker that the job executor builds on: its internals, in one place.

We keep Dramatiq's consumer threads (one per queue: they fetch, prefetch, heartbeat, and hold
delayed messages until their eta) and its in-memory priority work queue, and replace its
100 worker threads by coroutines on the process's event loop (engine/broker/executor.py).
This needs `dramatiq.worker.Worker`'s `_add_consumer`, `consumers` and `work_queue`, the
`ConsumerThread` hooks `close`, `handle_delayed_messages` and `post_process_message`, and the
Redis consumer's `queued_message_ids`. They are not public API: pyproject.toml pins Dramatiq's
minor version, and tests/test_engine_layout.py checks each assumption.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import Empty, PriorityQueue
from typing import Any, Protocol

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis, iter_queue, q_name
from dramatiq.worker import ConsumerThread, _WorkQueueItem

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import FAILED_KEEP

log = logging.getLogger(__name__)

# A consumer that cannot reach Redis says so at most this often.
WARN_EVERY_S = 5.0

WorkItem = _WorkQueueItem


class WorkQueue:
    """Dramatiq's in-memory work queue, as the executor uses it: the lowest actor priority
    first, first in first out within one; consumer threads (or the loop's own consumer) put,
    the executor takes without blocking, and an item's arrival wakes an idle executor.

    In place of Dramatiq's `PriorityQueue`, whose put and get each take and notify Python-
    level conditions and compare items in Python, about 10 us a message on the loop: one
    C lock, and a deque per priority (there are as many as actor priorities, three).
    """

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self._lanes: dict[int, deque[WorkItem]] = {}
        self._order: list[int] = []  # the lanes' priorities, ascending
        self._size = 0
        self.on_put: Callable[[], None] | None = None

    def put(self, item: WorkItem, block: bool = True, timeout: float | None = None) -> None:
        with self.mutex:
            lane = self._lanes.get(item.priority)
            if lane is None:
                lane = self._lanes[item.priority] = deque()
                bisect.insort(self._order, item.priority)
            lane.append(item)
            self._size += 1
        notify = self.on_put
        if notify is not None:
            notify()

    def get_nowait(self) -> WorkItem:
        """The most urgent item; raises queue.Empty."""
        with self.mutex:
            if self._size:
                for priority in self._order:
                    lane = self._lanes[priority]
                    if lane:
                        self._size -= 1
                        return lane.popleft()
        raise Empty

    def qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return not self._size

    def items(self) -> list[WorkItem]:
        """What waits now, most urgent first (a copy, for readers on other threads)."""
        with self.mutex:
            return [item for priority in self._order for item in self._lanes[priority]]


class LoopQueues(Protocol):
    """What fetches the queues instead of consumer threads (Redis: the loop's own consumer,
    engine/broker/loop_consumer.py)."""

    def add(self, queue: str) -> None:
        """Start fetching `queue` (a ready or a delay queue)."""

    def settled(self, message: MessageProxy) -> None:
        """`message` is settled: it no longer counts against its queue's prefetch."""

    def held_ids(self) -> set[str]:
        """Redis ids of the delayed messages held until their eta."""

    def dead(self) -> list[str]:
        """Queues whose fetching has stopped unasked."""

    async def close(self) -> None:
        """Stop fetching; hand back what was fetched and not started."""


def discard_outstanding(consumer_thread: ConsumerThread, message: MessageProxy) -> None:
    """The consumer stops counting `message` against its prefetch (it has been settled)."""
    consumer = consumer_thread.consumer
    if consumer is not None:
        consumer.queued_message_ids.discard(message.message_id)  # type: ignore[attr-defined]


class Consumer(ConsumerThread):
    """Dramatiq's consumer thread, hardened.

    - An error reply (OOM under `noeviction`, LOADING) while it hands back its delayed messages
      no longer kills the thread for good: Dramatiq only catches connection errors there.
    - A delayed message whose eta has passed moves to its queue in one atomic step, under the
      same id (promote.lua), so the user's pending mark keeps naming it.
    - A message that Dramatiq itself dead-letters (an unknown actor) gets a failed-list record.
    """

    _last_warning = 0.0

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("consumer of %s: %s: %r", self.queue_name, what, exc)

    @property
    def delay_queue(self) -> PriorityQueue[WorkItem]:
        return self._delay_queue

    @delay_queue.setter
    def delay_queue(self, fresh: PriorityQueue[WorkItem]) -> None:
        # After a connection error Dramatiq starts over with an empty delay queue, and the
        # delayed messages it held stay in this worker's ack set, never run: keep them.
        old: PriorityQueue[WorkItem] | None = self.__dict__.get("_delay_queue")
        if old is not None:
            for item in iter_queue(old):  # type: ignore[no-untyped-call]
                fresh.put(item)
        self._delay_queue = fresh

    def close(self) -> None:
        # Dramatiq's close takes the delayed messages out of memory before handing them back,
        # and lets an error reply (not a connection error) kill the thread for good.
        items: list[WorkItem] = list(iter_queue(self.delay_queue))  # type: ignore[no-untyped-call]
        consumer = self.consumer
        try:
            if consumer is not None and items:
                consumer.requeue([item.message for item in items])
        except Exception as exc:
            # Still ours in Redis: kept, and handed back or run once Redis takes writes.
            self._warn("could not hand back its delayed messages", exc)
            for item in items:
                self.delay_queue.put(item)
        try:
            if consumer is not None:
                consumer.close()
        except Exception as exc:
            self._warn("could not close", exc)

    def handle_delayed_messages(self) -> None:
        for item in iter_queue(self.delay_queue):  # type: ignore[no-untyped-call]
            message = item.message
            if item.priority > current_millis():
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                break
            try:
                self._promote(message)
            except (redis.RedisError, OSError) as exc:
                self._warn("could not move a delayed message to its queue", exc)
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                break
            discard_outstanding(self, message)
            self.delay_queue.task_done()

    def _promote(self, message: MessageProxy) -> None:
        queue = q_name(message.queue_name)
        ready = message.copy(queue_name=queue)
        del ready.options["eta"]
        self._scripts()[0](
            keys=[layout.NAMESPACE],
            args=[self._broker_id(), queue, message.options["redis_message_id"], ready.encode()],
        )

    def _broker_id(self) -> str:
        return str(self.broker.broker_id)  # type: ignore[attr-defined]

    def _scripts(self) -> tuple[Any, Any]:
        """(promote, settle) as redis-py scripts: EVALSHA, loading them on NOSCRIPT."""
        scripts: tuple[Any, Any] | None = self.__dict__.get("_prefetch_scripts")
        if scripts is None:
            client: redis.Redis = self.broker.client  # type: ignore[attr-defined]
            scripts = (
                client.register_script(layout.PROMOTE.source),
                client.register_script(layout.SETTLE.source),
            )
            self.__dict__["_prefetch_scripts"] = scripts
        return scripts

    def post_process_message(self, message: MessageProxy) -> None:
        if not message.failed:
            super().post_process_message(message)
            return
        # Only Dramatiq's own rejections come here (the executor settles the jobs it runs).
        group = layout.rejection_group(message, message._exception)
        try:
            self._scripts()[1](
                keys=layout.settle_keys(),
                args=[self._broker_id(), current_millis(), FAILED_KEEP, *group],
            )
        except (redis.RedisError, OSError) as exc:
            self._warn("could not dead-letter a rejected message", exc)
        discard_outstanding(self, message)


class LoopWorker(dramatiq.Worker):
    """Dramatiq's Worker with its consumer threads and work queue, and no worker threads:
    the executor takes the work queue's items onto the event loop."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        *,
        queue_prefetch: int,
        delay_prefetch: int,
        worker_timeout: int,
        consumer_factory: Callable[..., ConsumerThread] = Consumer,
    ) -> None:
        super().__init__(broker, worker_timeout=worker_timeout, worker_threads=0)
        self.queue_prefetch = queue_prefetch
        self.delay_prefetch = delay_prefetch
        # Dramatiq's consumer threads only `put` on it, and its `stop` takes with `get_nowait`.
        self.work_queue: WorkQueue = WorkQueue()  # type: ignore[assignment]
        # Redis: the hardened `Consumer` above. RabbitMQ: Dramatiq's own thread (whose broker
        # redelivers whatever a lost connection had not acknowledged), re-holding long delays.
        self.consumer_factory = consumer_factory
        # Redis: every queue is fetched on the event loop (engine/broker/loop_consumer.py).
        self.loop_consumer: LoopQueues | None = None

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        if queue_name in self.consumers:
            return
        if self.loop_consumer is not None:
            self.loop_consumer.add(queue_name)
            return
        consumer = self.consumers[queue_name] = self.consumer_factory(
            broker=self.broker,
            queue_name=queue_name,
            prefetch=self.delay_prefetch if delay else self.queue_prefetch,
            work_queue=self.work_queue,
            worker_timeout=self.worker_timeout,
        )
        consumer.start()

    def dead_consumers(self) -> list[str]:
        """Queues whose consumer has died (the process should be replaced)."""
        dead = [name for name, thread in self.consumers.items() if not thread.is_alive()]
        if self.loop_consumer is not None:
            dead += self.loop_consumer.dead()
        return dead

    def consumer_of(self, message: MessageProxy) -> ConsumerThread | None:
        return self.consumers.get(message.queue_name)

    def settled(self, message: MessageProxy) -> None:
        """`message` is settled: its consumer stops counting it against its prefetch."""
        thread = self.consumers.get(message.queue_name)
        if thread is not None:
            discard_outstanding(thread, message)
        elif self.loop_consumer is not None:
            self.loop_consumer.settled(message)

    def held_ids(self) -> set[str]:
        """Redis ids of the messages this process holds before the executor takes them: in
        each consumer's prefetch cache and delay queue, then in the work queue.

        Read from another thread than the consumers', in the order messages flow (cache,
        delay queue, work queue), so that one moving on meanwhile is seen where it was. One
        that a consumer thread has in hand between two of them is missed; callers confirm
        what is missing over two readings (engine/broker/reclaim.py).
        """
        held: set[str] = set()
        for thread in list(self.consumers.values()):
            consumer = thread.consumer
            for data in list(getattr(consumer, "message_cache", None) or ()):
                held.add(dramatiq.Message.decode(data).options["redis_message_id"])
            held.update(_queued_ids(thread.delay_queue))
        held.update(item.message.options["redis_message_id"] for item in self.work_queue.items())
        if self.loop_consumer is not None:
            held |= self.loop_consumer.held_ids()
        return held


def _queued_ids(queue: PriorityQueue[WorkItem]) -> set[str]:
    with queue.mutex:
        items = list(queue.queue)
    return {item.message.options["redis_message_id"] for item in items}

"""The parts of Dramatiq's worker that the job executor builds on: its internals, in one place.

We keep Dramatiq's Worker (its boot and shutdown, the middleware's view of it) and its work
queue's interface, and replace its 100 worker threads by coroutines on the process's event
loop (engine/broker/executor.py). On Redis the queues are fetched on that loop as well
(engine/broker/loop_consumer.py); on RabbitMQ Dramatiq's consumer threads fetch them
(engine/broker/rabbit_broker.py). This needs `dramatiq.worker.Worker`'s `_add_consumer`,
`consumers` and `work_queue`, and its `_WorkQueueItem`. They are not public API:
pyproject.toml pins Dramatiq's minor version, and tests/test_engine_layout.py checks each
assumption.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from queue import Empty
from typing import Protocol

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.worker import ConsumerThread, _WorkQueueItem

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
        consumer_factory: Callable[..., ConsumerThread] = ConsumerThread,
    ) -> None:
        super().__init__(broker, worker_timeout=worker_timeout, worker_threads=0)
        self.queue_prefetch = queue_prefetch
        self.delay_prefetch = delay_prefetch
        # Dramatiq's consumer threads only `put` on it, and its `stop` takes with `get_nowait`.
        self.work_queue: WorkQueue = WorkQueue()  # type: ignore[assignment]
        # RabbitMQ: Dramatiq's own thread (whose broker redelivers whatever a lost connection
        # had not acknowledged), re-holding long delays. Redis: not used (below).
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
        """`message` (Redis) is settled: it no longer counts against its queue's prefetch."""
        if self.loop_consumer is not None:
            self.loop_consumer.settled(message)

    def held_ids(self) -> set[str]:
        """Redis ids of the messages this process holds before the executor takes them: the
        delayed ones held until their eta, then those in the work queue (the reclaimer's,
        engine/broker/reclaim.py, which confirms what is missing over two readings).
        """
        held = self.loop_consumer.held_ids() if self.loop_consumer is not None else set()
        held.update(item.message.options["redis_message_id"] for item in self.work_queue.items())
        return held

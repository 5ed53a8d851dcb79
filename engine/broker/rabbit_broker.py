"""Everything that knows Dramatiq's RabbitMQ broker (BROKER_URL=amqp://...).

Dramatiq (`dramatiq[rabbitmq]`, pika; pinned to its minor version in pyproject.toml, the
assumptions checked by tests/test_engine_rabbit.py) declares, per queue `Q`, the queue, its
delay queue `Q.DQ` (consumers hold delayed messages until their eta, then publish them to `Q`)
and its dead-letter queue `Q.XQ` (where a rejected message goes, kept 7 days).

Our choices over Dramatiq's defaults:
- Queues are quorum queues (BROKER_QUEUE_TYPE=quorum, the default) or classic ones. Priority
  is by queue, one per priority, as on Redis, not by `x-max-priority`: RabbitMQ refuses
  `x-max-priority` on quorum queues before 4.0 (this machine runs 3.10; 4.x has two levels
  only), and one queue per priority also gives exact per-priority counts.
- Every publish waits for its publisher confirm (`confirm_delivery=True`), so an enqueue that
  returned is on the broker's disk.
- Inside a ledger (engine/broker/ledger.py) `enqueue` records the message instead of sending
  it: the worker publishes it before it acknowledges the job that enqueued it.

The producers (the API, the scheduler, the workers' settler) are asyncio code, and pika's
blocking connection is per thread: `Publisher` runs Dramatiq's `enqueue` and the passive
queue declares (the counts) on a few threads of its own, each with its own connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import dramatiq
import pika
import pika.exceptions
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import dq_name, iter_queue, xq_name
from dramatiq.errors import BrokerConnectionError
from dramatiq.worker import ConsumerThread

from engine.broker import ledger
from engine.errors import BrokerTimeout, BrokerUnavailable
from engine.settings import Settings

log = logging.getLogger(__name__)

PUBLISH_THREADS = 8
# A worker's gauge older than this is ignored by the stats (its process is gone or stuck).
GAUGE_STALE_MS = 10_000
# A consumer that cannot reach RabbitMQ says so at most this often (it retries each second).
WARN_EVERY_S = 5.0


class PrefetchRabbitBroker(RabbitmqBroker):
    """Dramatiq's RabbitmqBroker with our queue type, publisher confirms and ledger capture."""

    broker_id = ""  # which worker process this is (its gauge); Dramatiq's has none

    def __init__(
        self, *, url: str, queue_type: str, middleware: list[dramatiq.Middleware] | None = None
    ) -> None:
        super().__init__(url=url, confirm_delivery=True, middleware=middleware)
        self.queue_type = queue_type

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        arguments["x-queue-type"] = self.queue_type
        return arguments

    def _declare_xq_queue(self, queue_name: str) -> Any:
        arguments = {"x-message-ttl": DEAD_MESSAGE_TTL, "x-queue-type": self.queue_type}
        return self.channel.queue_declare(
            queue=xq_name(queue_name), durable=True, arguments=arguments
        )

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> Any:
        recording = ledger.active()
        if recording is None:
            return super().enqueue(message, delay=delay)
        queue = dq_name(message.queue_name) if delay is not None else message.queue_name
        frozen = message.copy()  # as it is now: sent later, after its run settles
        outgoing = ledger.Outgoing(queue, frozen.message_id, message=frozen, delay=delay)
        recording.messages.append(outgoing)
        return message

    def close(self) -> None:
        # A connection the broker already dropped (an idle publisher thread's, past its
        # heartbeats) makes pika log an ERROR when closed again: leave those out.
        self.channels = {c for c in self.channels if c.is_open}
        self.connections = {c for c in self.connections if c.is_open}
        super().close()

    def publish(self, message: dramatiq.Message[Any], delay: int | None) -> None:
        """Dramatiq's enqueue, never recorded: returns once the broker confirmed it."""
        RabbitmqBroker.enqueue(self, message, delay=delay)

    def ready_counts(self, queues: list[str]) -> list[int]:
        """Ready messages of each queue (passive declares; a missing queue counts 0)."""
        counts = []
        for name in queues:
            try:
                reply = self.channel.queue_declare(queue=name, passive=True)
                counts.append(int(reply.method.message_count))
            except pika.exceptions.ChannelClosedByBroker as exc:
                del self.channel
                if exc.reply_code != 404:
                    raise
                counts.append(0)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                del self.connection
                raise
        return counts


def make_rabbit_broker(
    settings: Settings, middleware: list[dramatiq.Middleware] | None = None
) -> PrefetchRabbitBroker:
    """The broker on BROKER_URL with our queue type (no connection is opened yet)."""
    return PrefetchRabbitBroker(
        url=settings.broker_url, queue_type=settings.broker_queue_type, middleware=middleware
    )


def all_queues(queues: list[str]) -> list[str]:
    """Each queue, its delay queue and its dead-letter queue."""
    return [q for name in queues for q in (name, dq_name(name), xq_name(name))]


# --- a consumer thread's RabbitMQ consumer (Dramatiq's `_RabbitmqConsumer`) --------------------
# Its `ack`/`nack` send on the consumer's own connection, from any thread, through pika's
# `add_callback_threadsafe`; `known_tags` holds the delivery tags it handed out and that are not
# settled yet. Handing a message back uses the same two internals. After a lost connection the
# thread has a new consumer on a new channel, whose delivery tags start again at 1: a message
# of the old channel must not be acknowledged through the new one (its tag may name another
# message there), so each message remembers the consumer that delivered it.

_DELIVERED_BY = "_prefetch_delivered_by"


def acknowledge(thread: ConsumerThread | None, message: MessageProxy, verb: str) -> None:
    """ack, nack (to the dead-letter queue) or back (requeue) one message; a consumer gone
    since (connection lost) needs nothing: the broker has redelivered what it had not acked."""
    consumer: Any = thread.consumer if thread is not None else None
    if consumer is None or vars(message).get(_DELIVERED_BY, consumer) is not consumer:
        return
    with contextlib.suppress(BrokerConnectionError, pika.exceptions.AMQPError):
        if verb == "ack":
            consumer.ack(message)
        elif verb == "nack":
            consumer.nack(message)
        elif message._tag in consumer.known_tags:
            consumer.known_tags.discard(message._tag)
            consumer.connection.add_callback_threadsafe(
                partial(consumer.channel.basic_nack, message._tag, requeue=True)
            )


def held(thread: ConsumerThread) -> int:
    """Messages this consumer thread received and has not settled."""
    consumer: Any = thread.consumer
    return len(consumer.known_tags) if consumer is not None else 0


class Publisher:
    """Runs the broker's blocking calls (publish with confirm, counts) on threads of its own."""

    def __init__(
        self, broker: PrefetchRabbitBroker, threads: int = PUBLISH_THREADS, *, owner: bool = True
    ) -> None:
        self.broker = broker
        self._owner = owner  # whether closing this closes the broker's connections too
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="amqp-publish"
        )

    async def publish(
        self, message: dramatiq.Message[Any], delay: int | None, timeout_s: float
    ) -> None:
        """Publish and wait for the confirm; BrokerUnavailable if it failed, BrokerTimeout if
        it took longer than `timeout_s` (then it may still land)."""
        await self._call(timeout_s, self.broker.publish, message, delay)

    async def ready_counts(self, queues: list[str], timeout_s: float) -> list[int]:
        counts: list[int] = await self._call(timeout_s, self.broker.ready_counts, queues)
        return counts

    async def _call(self, timeout_s: float, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._pool, fn, *args), max(0.001, timeout_s)
            )
        except TimeoutError:
            raise BrokerTimeout(f"RabbitMQ did not answer within {timeout_s:.1f}s") from None
        except (
            BrokerConnectionError,
            pika.exceptions.AMQPError,
            OSError,
        ) as exc:
            raise BrokerUnavailable(f"RabbitMQ: {exc!r}") from None

    async def close(self) -> None:
        """Stop the threads, then (as the broker's owner) close every connection it opened."""
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        if self._owner:
            await asyncio.to_thread(self.broker.close)


# --- what each worker holds: reported by the workers, read by the stats ------------------------


def encode_gauge(active: Mapping[str, int], delayed: Mapping[str, int], queues: list[str]) -> str:
    """`<epoch ms> <active per queue...> <delayed per queue...>`."""
    numbers = [int(time.time() * 1000)]
    numbers += [active.get(q, 0) for q in queues]
    numbers += [delayed.get(q, 0) for q in queues]
    return " ".join(map(str, numbers))


def decode_gauge(
    raw: bytes, queues: list[str], now_ms: int
) -> tuple[dict[str, int], dict[str, int]] | None:
    """(active, delayed) per queue from a live gauge; None when stale or unreadable."""
    try:
        numbers = [int(n) for n in raw.split()]
    except ValueError:
        return None
    if len(numbers) != 1 + 2 * len(queues) or now_ms - numbers[0] > GAUGE_STALE_MS:
        return None
    n = len(queues)
    active = dict(zip(queues, numbers[1 : 1 + n], strict=True))
    delayed = dict(zip(queues, numbers[1 + n :], strict=True))
    return active, delayed


class RabbitConsumer(ConsumerThread):
    """Dramatiq's consumer thread, which hands back delayed messages it has held too long.

    Dramatiq holds a delayed message, unacknowledged, until its eta; RabbitMQ closes a channel
    whose delivery stays unacknowledged past its `consumer_timeout` (30 min by default), and
    a delay may be 24 h. A delayed message held for `rehold_ms` is handed back (requeued and
    redelivered at once, its eta unchanged), which restarts the broker's clock.
    """

    def __init__(self, *, rehold_ms: int, **options: Any) -> None:
        super().__init__(**options)
        self.logger.addFilter(_OncePer(WARN_EVERY_S))
        self.rehold_ms = rehold_ms
        self._received: dict[int, float] = {}  # delivery tag -> when it was received
        self._next_check = 0.0

    def handle_message(self, message: MessageProxy) -> None:
        self._received[message._tag] = time.monotonic()
        vars(message)[_DELIVERED_BY] = self.consumer
        super().handle_message(message)

    def handle_delayed_messages(self) -> None:
        super().handle_delayed_messages()
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + min(1.0, self.rehold_ms / 2000)
        kept, handed = [], 0
        for item in iter_queue(self.delay_queue):  # type: ignore[no-untyped-call]
            self.delay_queue.task_done()
            tag = item.message._tag
            if (now - self._received.get(tag, now)) * 1000 >= self.rehold_ms:
                acknowledge(self, item.message, "back")
                handed += 1
            else:
                kept.append(item)
        for item in kept:
            self.delay_queue.put(item)
        consumer: Any = self.consumer
        held_tags = consumer.known_tags if consumer is not None else set()
        self._received = {t: at for t, at in self._received.items() if t in held_tags}
        if handed:
            log.info(
                "%s: handed back %d delayed messages held %d ms",
                self.queue_name,
                handed,
                self.rehold_ms,
            )


class _OncePer(logging.Filter):
    """Lets a consumer thread's connection errors through at most once per period: Dramatiq
    logs one (CRITICAL) and a restart line each second while the broker is away."""

    def __init__(self, period_s: float) -> None:
        super().__init__()
        self.period_s = period_s
        self._last = -period_s

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith(("Consumer encountered a connection error", "Restarting")):
            return True
        now = time.monotonic()
        if message.startswith("Restarting"):
            return now - self._last < 0.1  # only the one after a reported error
        if now - self._last < self.period_s:
            return False
        self._last = now
        return True

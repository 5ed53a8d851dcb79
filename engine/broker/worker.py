"""A worker process: uvloop, Dramatiq's consumers, the job executor, one Runtime.

Built entirely after fork by `run_worker`. On Redis every queue, ready or delayed, is fetched
on this process's loop (engine/broker/loop_consumer.py); on RabbitMQ Dramatiq's consumer
threads fetch them. The executor runs the messages as coroutines on the loop,
`PREFETCH_JOB_CONCURRENCY` at once, and settles them in batches (engine/broker/executor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable

import dramatiq
import redis
import uvloop
from dramatiq.middleware import CurrentMessage, Retries
from dramatiq.worker import ConsumerThread

from engine.broker import dramatiq_layout as layout
from engine.broker.actors import JobOutcome, RuntimeHolder, register_actors
from engine.broker.dramatiq_worker import LoopWorker
from engine.broker.executor import Executor, Handler, RedisSettler
from engine.broker.jobs import FAILED_KEEP, QUEUES
from engine.broker.loop_consumer import LoopConsumer
from engine.broker.rabbit_broker import PrefetchRabbitBroker, RabbitConsumer, make_rabbit_broker
from engine.broker.rabbit_settle import RabbitSettler
from engine.broker.reclaim import Reclaimer
from engine.errors import RedisReplyError, RedisUnavailable
from engine.metrics import prometheus, tally
from engine.process import set_title, settle_heap
from engine.runtime import open_runtime, queue_client
from engine.settings import Settings
from engine.store.fastredis import FastRedis

log = logging.getLogger(__name__)

# A worker that stops heartbeating for this long has its unacked messages handed to others.
# The supervisor requeues a dead child's messages at once; this covers a whole lost pod.
HEARTBEAT_TIMEOUT_MS = 15_000
# Per million dispatch calls; maintenance is what finds dead workers (see dispatch.lua).
MAINTENANCE_CHANCE = 20_000
# Longest idle poll of an empty queue: bounds how late a `high` job is seen.
POLL_TIMEOUT_MS = 250
# After the drain, time for the consumer threads to notice the stop (a few polls).
STOP_CONSUMERS_MS = 1_000
# How often the process checks that its consumer threads are alive.
WATCH_S = 1.0
EXIT_CONSUMER_DIED = 5


def broker_pool(settings: Settings) -> redis.BlockingConnectionPool:
    """The broker's redis-py pool, sized from the threads that may use it.

    The worker's fetches and settles go through FastRedis on its loop; redis-py serves what
    Dramatiq itself sends (an enqueue outside a job's ledger, a consumer thread if one were
    started). A blocking pool makes a burst wait for a connection instead of failing with
    `Too many connections` (redis-py's default pool is capped and raises).
    """
    consumers = 2 * len(QUEUES)
    return redis.BlockingConnectionPool.from_url(
        settings.queue_redis_url, db=settings.db_queue, max_connections=consumers + 2, timeout=20
    )


def make_broker(
    settings: Settings, broker_id: str | None = None
) -> tuple[dramatiq.Broker, RuntimeHolder, dict[str, Handler]]:
    """The broker BROKER_URL names (Redis: the queue DB under the `prefetch:queue` namespace;
    RabbitMQ: its queues), with our middleware and the actors."""
    holder = RuntimeHolder()
    middleware: list[dramatiq.Middleware] = [
        CurrentMessage(),
        JobOutcome(holder),
        # Attempts after the first; upstream failures raise Retry with an exact delay,
        # anything else unexpected backs off from PREFETCH_BACKOFF_MS (with jitter).
        Retries(
            max_retries=settings.prefetch_max_attempts - 1,
            min_backoff=max(1, settings.prefetch_backoff_ms),
            max_backoff=600_000,
        ),
    ]
    broker: layout.PrefetchBroker | PrefetchRabbitBroker
    if settings.broker_kind == "rabbitmq":
        broker = make_rabbit_broker(settings, middleware)
    else:
        broker = layout.PrefetchBroker(  # type: ignore[no-untyped-call]
            client=redis.Redis(connection_pool=broker_pool(settings)),
            namespace=layout.NAMESPACE,
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            maintenance_chance=MAINTENANCE_CHANCE,
            middleware=middleware,
        )
    if broker_id is not None:
        broker.broker_id = broker_id
    holder.broker = broker
    handlers = register_actors(broker, holder)
    return broker, holder, handlers


def make_worker(settings: Settings, broker: dramatiq.Broker) -> LoopWorker:
    """The worker; on Redis, `serve` gives it the loop consumer before it starts."""
    factory: Callable[..., ConsumerThread] = ConsumerThread
    if isinstance(broker, PrefetchRabbitBroker):
        factory = functools.partial(RabbitConsumer, rehold_ms=settings.broker_rehold_ms)
    return LoopWorker(
        broker,
        queue_prefetch=settings.queue_prefetch,
        delay_prefetch=settings.delay_queue_prefetch,
        worker_timeout=POLL_TIMEOUT_MS,
        consumer_factory=factory,
    )


def make_loop_consumer(
    settings: Settings, broker: layout.PrefetchBroker, queue: FastRedis, worker: LoopWorker
) -> LoopConsumer:
    """A Redis worker's fetcher of every queue, on its loop, into the worker's work queue."""
    return LoopConsumer(
        broker,
        queue,
        worker.work_queue,
        prefetch=settings.queue_prefetch,
        delay_prefetch=settings.delay_queue_prefetch,
        poll_ms=POLL_TIMEOUT_MS,
    )


def run_worker(settings: Settings, index: int, broker_id: str) -> int:
    """Body of a worker child: serve jobs until SIGTERM/SIGINT, then drain. Returns exit code."""
    set_title(f"prefetch: worker {index}")
    return uvloop.run(serve(settings, index, broker_id))


async def serve(settings: Settings, index: int, broker_id: str) -> int:
    """Serve jobs on this loop until a signal (drain) or a dead consumer (exit to be replaced)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(1)  # a second signal kills, drain or not
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    broker, holder, handlers = make_broker(settings, broker_id)
    http_limit = settings.job_concurrency * 2
    async with open_runtime(settings, http_limit=http_limit) as runtime:
        holder.runtime = runtime
        worker = make_worker(settings, broker)
        queue = queue_client(runtime.redis)
        settler: RedisSettler | RabbitSettler
        if isinstance(broker, PrefetchRabbitBroker):
            settler = RabbitSettler(broker, worker, queue, FAILED_KEEP)
        else:
            assert isinstance(broker, layout.PrefetchBroker)
            settler = RedisSettler(broker, worker, queue, FAILED_KEEP)
            worker.loop_consumer = make_loop_consumer(settings, broker, queue, worker)
        executor = Executor(broker, worker, settler, handlers, concurrency=settings.job_concurrency)
        broker.emit_after("process_boot")
        worker.start()
        executor.start()
        if isinstance(settler, RabbitSettler):
            settler.start()
        # Redis broker only: a message whose fetch reply was lost stays in this worker's ack
        # set; RabbitMQ redelivers by itself what an unacknowledged channel held.
        sweeping: asyncio.Task[None] | None = None
        if isinstance(settler, RedisSettler):
            reclaimer = Reclaimer(broker_id, queue, worker, executor)
            sweeping = asyncio.create_task(reclaimer.run(), name="reclaim-stranded")
        settle_heap()
        publishing = asyncio.create_task(_publish_metrics(executor), name="job-metrics")
        log.info("worker %d up (%s), %d jobs in flight", index, broker_id, settings.job_concurrency)
        code = await _watch(worker, stop)
        if sweeping is not None:
            sweeping.cancel()  # what the drain hands back is not stranded
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping
        log.info("worker %d draining (up to %d ms)", index, settings.prefetch_shutdown_timeout_ms)
        draining = asyncio.create_task(
            executor.drain(settings.prefetch_shutdown_timeout_ms / 1000), name="drain"
        )
        beating: asyncio.Task[None] | None = None
        if worker.loop_consumer is not None:
            # Fetch no more, and hand back what waits unstarted or delayed (the drain takes
            # nothing new). The fetches beat this worker's heartbeat: without it, another
            # worker's maintenance would hand back the jobs still running here.
            assert isinstance(broker, layout.PrefetchBroker)
            beating = asyncio.create_task(_beat(queue, broker), name="heartbeat")
            await worker.loop_consumer.close()
        stuck = await draining
        if beating is not None:
            beating.cancel()
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        _publish(executor)
        if stuck:
            log.warning("%d jobs still running at shutdown: handed back to the queue", stuck)
        # Hands back what was fetched but not started, stops and closes the consumers.
        await asyncio.to_thread(worker.stop, STOP_CONSUMERS_MS)
        if isinstance(settler, RabbitSettler):
            await settler.close()
    broker.close()
    return code


async def _beat(redis: FastRedis, broker: layout.PrefetchBroker) -> None:
    """Beat this worker's heartbeat three times per timeout, until cancelled."""
    while True:
        try:
            await layout.beat(redis, broker)
        except (RedisUnavailable, RedisReplyError) as exc:
            log.info("heartbeat skipped: %r", exc)
        await asyncio.sleep(broker.heartbeat_timeout / 3000)


def _publish(executor: Executor) -> None:
    """The jobs running now, and what the jobs tallied since the last call (tally.py)."""
    prometheus.JOBS_IN_FLIGHT.set(executor.in_flight)
    tally.flush()


async def _publish_metrics(executor: Executor) -> None:
    """Publish the job metrics once a second (a job adds to in-memory tallies only)."""
    while True:
        await asyncio.sleep(tally.FLUSH_INTERVAL_S)
        _publish(executor)


async def _watch(worker: LoopWorker, stop: asyncio.Event) -> int:
    """Wait for the stop signal; a consumer thread that died makes the process exit instead
    (the supervisor replaces it and hands its messages back)."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), WATCH_S)
            return 0
        except TimeoutError:
            dead = worker.dead_consumers()
            if dead:
                log.error("consumer threads died (%s): exiting to be replaced", ", ".join(dead))
                return EXIT_CONSUMER_DIED

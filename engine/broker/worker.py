"""A worker process: uvloop, one Dramatiq worker, one Runtime (Redis, HTTP session).

Built entirely after fork by `run_worker`. Async actors run on Dramatiq's event-loop thread
(uvloop); `PREFETCH_JOB_CONCURRENCY` worker threads each hold one job in flight.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from contextlib import AbstractAsyncContextManager
from types import FrameType

import dramatiq
import redis
import uvloop
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO, Retries, TimeLimit

from engine.broker.actors import RuntimeHolder, register_actors
from engine.process import set_title
from engine.runtime import Runtime, open_runtime
from engine.settings import Settings
from engine.store import keys

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


class QuietAsyncIO(AsyncIO):
    """Dramatiq's AsyncIO middleware, with job threads waking once a second, not ten times.

    Each thread waiting on its coroutine polls for asynchronous interrupts (time limits)
    every `interrupt_check_ival`; with 100 threads the default 0.1 s costs 1,000 wake-ups a
    second. A time limit of minutes does not need a tenth of a second of precision.
    """

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = EventLoopThread(self.logger, interrupt_check_ival=1.0)
        thread.start(timeout=1.0)
        set_event_loop_thread(thread)


class RuntimeMiddleware(dramatiq.Middleware):
    """Opens the Runtime on the event-loop thread at boot, closes it at shutdown.

    It must come right after AsyncIO in the middleware list: `before_*` hooks run in list
    order (the loop exists before the Runtime opens, and the Runtime is open before the first
    consumer starts, so no job finds it missing) and `after_*` hooks in reverse order (the
    Runtime closes while the loop still runs).
    """

    def __init__(self, settings: Settings, holder: RuntimeHolder) -> None:
        self._settings = settings
        self._holder = holder
        self._lifespan: AbstractAsyncContextManager[Runtime] | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        assert thread is not None, "AsyncIO middleware must come before RuntimeMiddleware"
        self._lifespan = open_runtime(self._settings, http_limit=self._settings.job_concurrency * 2)
        self._holder.runtime = thread.run_coroutine(self._lifespan.__aenter__())

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        runtime = self._holder.runtime
        if self._lifespan is None or thread is None or runtime is None:
            return
        stuck = sum(1 for t in worker.workers if t.is_alive())
        if stuck:
            # Jobs still running after PREFETCH_SHUTDOWN_TIMEOUT stay unacked and go back to
            # the queue when this process exits; closing the session under them would turn
            # the shutdown into upstream failures (and retries). Only save the metrics.
            log.warning("%d jobs still running at shutdown: handed back to the queue", stuck)
            thread.run_coroutine(runtime.stats.flush())
            return
        thread.run_coroutine(self._lifespan.__aexit__(None, None, None))
        self._holder.runtime = None


def make_broker(settings: Settings, broker_id: str | None = None) -> RedisBroker:
    """A RedisBroker on the queue DB under the `prefetch:queue` namespace."""
    holder = RuntimeHolder()
    # redis-py 8 caps a pool at 100 connections by default; every job thread may hold one.
    client = redis.Redis.from_url(
        settings.redis_url, db=settings.db_queue, max_connections=settings.job_concurrency + 50
    )
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        client=client,
        namespace=keys.QUEUE_NAMESPACE,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
        middleware=[
            TimeLimit(),
            # Only for unexpected errors (Redis lost mid-job): upstream failures retry in
            # engine.broker.actors with exact delays.
            Retries(max_retries=20, min_backoff=1_000, max_backoff=60_000),
            QuietAsyncIO(),
            RuntimeMiddleware(settings, holder),
        ],
    )
    if broker_id is not None:
        broker.broker_id = broker_id
    register_actors(broker, holder)
    return broker


def make_worker(settings: Settings, broker: RedisBroker) -> dramatiq.Worker:
    worker = dramatiq.Worker(
        broker, worker_threads=settings.job_concurrency, worker_timeout=POLL_TIMEOUT_MS
    )
    worker.queue_prefetch = settings.queue_prefetch
    worker.delay_prefetch = settings.delay_queue_prefetch
    return worker


def run_worker(settings: Settings, index: int, broker_id: str) -> int:
    """Body of a worker child: serve jobs until SIGTERM/SIGINT, then drain. Returns exit code."""
    set_title(f"prefetch: worker {index}")
    uvloop.install()
    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(1)  # a second signal kills, drain or not
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker = make_broker(settings, broker_id)
    broker.emit_after("process_boot")  # as Dramatiq's CLI does: starts TimeLimit's timer
    worker = make_worker(settings, broker)
    worker.start()
    # Everything alive now (modules, the Runtime) lives as long as the process: keep it out
    # of every future collection, which otherwise rescans it while 100 jobs churn objects.
    gc.freeze()
    log.info("worker %d up (%s), %d jobs in flight", index, broker_id, settings.job_concurrency)
    stop.wait()
    log.info("worker %d draining (up to %d ms)", index, settings.prefetch_shutdown_timeout_ms)
    drain(worker, settings.prefetch_shutdown_timeout_ms)
    broker.close()
    return 0


def drain(worker: dramatiq.Worker, timeout_ms: int) -> None:
    """Let the running jobs finish within `timeout_ms` in all, then stop the worker.

    Worker.stop(timeout) alone cuts drains short: its join_all subtracts the total elapsed
    time from the remaining budget at every thread, so with 100 threads idling in 250 ms polls
    a 10 s budget is gone after ~40 joins and a job still running is abandoned in under a
    second. Jobs left running past the deadline stay unacknowledged: the supervisor hands
    them back to the queue when this process exits.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    for thread in worker.workers:
        thread.stop()  # finish the current job, take no new one
    for thread in worker.workers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    # Requeues what was prefetched but not started, stops the consumers, closes the Runtime.
    worker.stop(timeout=STOP_CONSUMERS_MS)

"""The scheduler's life in a process: contend for the lease, tick while leading.

`run_scheduler` opens its own Redis connections and metrics recorder, keeps the lease in a
background task (leader.Lease.keep) and, while it leads, calls `Scheduler.tick` every
ACTIVITY_CHECK_INTERVAL with the lease as fence, then publishes the tick's report (fenced as
well). A new leader ticks at once. A fenced enqueue means the lease is gone: it stops leading
on the spot. Redis errors end the tick, never the process: it tries again next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine import tracing
from engine.broker.backend import open_job_queue
from engine.metrics.daily import StatsRecorder
from engine.runtime import queue_client, redis_clients
from engine.settings import Settings
from engine.store.cache import wall_clock_ms
from engine.strategies.leader import Lease
from engine.strategies.scheduler import Scheduler

log = logging.getLogger(__name__)


async def run_scheduler(
    settings: Settings, stop: asyncio.Event, identity: str | None = None
) -> None:
    """Contend, lead and tick until `stop` is set; release the lease on the way out."""
    with tracing.session(settings):
        await _run(settings, stop, identity)


async def _run(settings: Settings, stop: asyncio.Event, identity: str | None) -> None:
    redis = redis_clients(settings)
    stats = StatsRecorder(redis["metrics"], settings.metrics_retention_days)
    stats.start()
    lease = Lease(redis["queue"], settings.scheduler_lease_ttl_ms, identity)
    jobs = open_job_queue(settings, queue_client(redis))
    scheduler = Scheduler(settings, redis, jobs, stats)
    keeper = asyncio.create_task(lease.keep(stop), name="scheduler-lease")
    interval = settings.activity_check_interval_ms / 1000
    poll = min(interval, settings.scheduler_lease_ttl_ms / 4000)
    next_tick: float | None = None  # monotonic; None while not leading
    try:
        while not stop.is_set():
            if not lease.leading:
                next_tick = None
            elif next_tick is None or time.monotonic() >= next_tick:
                next_tick = time.monotonic() + interval
                await _tick(scheduler, lease)
            wait = poll if next_tick is None else max(0.0, next_tick - time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), min(wait, poll))
            except TimeoutError:
                pass
    finally:
        stop.set()
        await keeper
        await jobs.close()
        await stats.stop()
        for client in {id(c): c for c in redis.values()}.values():
            await client.close()


async def _tick(scheduler: Scheduler, lease: Lease) -> None:
    fence = lease.fence()
    if fence is None:
        return
    try:
        with tracing.span("scheduler.tick", attributes={"prefetch.fence": fence.value}):
            report = await scheduler.tick(wall_clock_ms(), fence)
    except Exception as exc:
        log.warning("scheduler tick failed: %r", exc)
        return
    if report.fenced:
        lease.lost()
        return
    try:
        await lease.report(report.fields())
    except Exception as exc:
        log.warning("scheduler tick report failed: %r", exc)
    if report.batches:
        log.info(
            "tick: %d batches (%s) in %d ms",
            report.batches,
            ", ".join(f"{origin} {n}" for origin, n in report.selected.items()),
            report.duration_ms,
        )

"""Per-process resources, built after fork in one lifespan and closed in reverse order.

The API process and every worker child open a Runtime; nothing here is created at import
time or shared across processes. Redis connections are lazy, so a process starts (and
answers health checks) while Redis is down, and reconnects when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from engine.broker.backend import open_job_queue
from engine.broker.jobs import JobQueue
from engine.metrics.daily import StatsRecorder
from engine.prefetcher import Prefetcher
from engine.settings import Settings
from engine.store.cache import TimelineCache
from engine.store.fastredis import FastRedis
from engine.upstream import CAClient, ServiceTokens, TimelineClient, make_session


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a process needs to serve reads and run prefetches."""

    settings: Settings
    redis: dict[str, FastRedis]  # by role: hot, warm, queue, metrics (shared when DBs match)
    session: aiohttp.ClientSession
    timeline: TimelineClient
    ca: CAClient
    cache: TimelineCache
    stats: StatsRecorder
    prefetcher: Prefetcher
    jobs: JobQueue
    # Bounds the prefetches of batch messages to PREFETCH_JOB_CONCURRENCY per process: 100
    # messages x 50 users at once would queue on the connection pool until they time out.
    batch_slots: asyncio.Semaphore


def redis_clients(settings: Settings) -> dict[str, FastRedis]:
    """One lazy connection per distinct server and DB, keyed by role (the queue role is on
    BROKER_URL's Redis when it names one)."""
    by_db: dict[tuple[str, int], FastRedis] = {}
    roles = {
        "hot": (settings.redis_url, settings.db_hot),
        "warm": (settings.redis_url, settings.db_warm),
        "queue": (settings.queue_redis_url, settings.db_queue),
        "metrics": (settings.redis_url, settings.db_metrics),
    }
    clients: dict[str, FastRedis] = {}
    for role, where in roles.items():
        if where not in by_db:
            by_db[where] = FastRedis(*where)
        clients[role] = by_db[where]
    return clients


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, *, http_limit: int = 200) -> AsyncIterator[Runtime]:
    """Open the process's resources; close them in reverse order on exit."""
    redis = redis_clients(settings)
    try:
        session = make_session(http_limit)
        try:
            tokens = ServiceTokens(settings, session)
            timeline = TimelineClient(settings, session, tokens)
            cache = TimelineCache(settings, redis["hot"], redis["warm"])
            stats = StatsRecorder(redis["metrics"], settings.metrics_retention_days)
            stats.start()
            try:
                jobs = open_job_queue(settings, redis["queue"])
                try:
                    yield Runtime(
                        settings=settings,
                        redis=redis,
                        session=session,
                        timeline=timeline,
                        ca=CAClient(settings, session),
                        cache=cache,
                        stats=stats,
                        prefetcher=Prefetcher(cache, timeline, stats),
                        jobs=jobs,
                        batch_slots=asyncio.Semaphore(settings.job_concurrency),
                    )
                finally:
                    await jobs.close()
            finally:
                await stats.stop()
        finally:
            await session.close()
    finally:
        for client in {id(c): c for c in redis.values()}.values():
            await client.close()

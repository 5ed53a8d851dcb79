"""Per-process resources, built after fork in one lifespan and closed in reverse order.

The API process and every worker child open a Runtime; nothing here is created at import
time or shared across processes. Redis connections are lazy, so a process starts (and
answers health checks) while Redis is down, and reconnects when it is back.

With REDIS_CLUSTER_MODE=true the cache roles (hot, warm, metrics) share one ClusterRedis on
the Cluster (every key names its tier or role; a Cluster has no DB numbers), and the queue
role stays on a single node, BROKER_URL's: Dramatiq's scripts and ours touch many queue keys
at once (engine/store/keys.py says which keys live where).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from engine import tracing
from engine.broker.backend import open_job_queue
from engine.broker.jobs import JobQueue
from engine.metrics.daily import StatsRecorder
from engine.prefetcher import Prefetcher
from engine.settings import Settings
from engine.store.cache import TimelineCache
from engine.store.client import RedisClient
from engine.store.cluster import ClusterRedis
from engine.store.fastredis import FastRedis
from engine.store.local_cache import LocalCache
from engine.upstream import CAClient, ServiceTokens, TimelineClient, make_session


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a process needs to serve reads and run prefetches."""

    settings: Settings
    # By role: hot, warm, queue, metrics (shared when DBs match), and background: the metrics
    # store on a connection of its own for the periodic flushes (see redis_clients).
    redis: dict[str, RedisClient]
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


def redis_clients(settings: Settings) -> dict[str, RedisClient]:
    """One lazy client per distinct location, keyed by role (see the module docstring), and
    one for background flushes.

    Replies on a connection come in order, and a command without a reply in time drops the
    connection with everything in flight: a large stats or activity flush sharing the read
    path's socket would delay reads behind it, or fail them with it.
    """
    queue = FastRedis(settings.queue_redis_url, settings.db_queue)
    if settings.redis_cluster_mode:
        # One client for every role: glide multiplexes, and a request that times out fails
        # alone (not everything in flight, as on a FastRedis socket): no background twin.
        cluster = ClusterRedis(settings.redis_url)
        return {
            "hot": cluster,
            "warm": cluster,
            "queue": queue,
            "metrics": cluster,
            "background": cluster,
        }
    by_db: dict[int, RedisClient] = {}
    if settings.queue_redis_url == settings.redis_url:
        by_db[settings.db_queue] = queue
    roles = {"hot": settings.db_hot, "warm": settings.db_warm, "metrics": settings.db_metrics}
    clients: dict[str, RedisClient] = {
        role: by_db.setdefault(db, FastRedis(settings.redis_url, db)) for role, db in roles.items()
    }
    clients["queue"] = queue
    clients["background"] = FastRedis(settings.redis_url, settings.db_metrics)
    return clients


def queue_client(redis: dict[str, RedisClient]) -> FastRedis:
    """The queue role's client, always a single-node FastRedis (see the module docstring)."""
    client = redis["queue"]
    if not isinstance(client, FastRedis):
        raise TypeError("the queue role needs a single-node FastRedis")
    return client


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings, *, http_limit: int = 200, local_cache: bool = False
) -> AsyncIterator[Runtime]:
    """Open the process's resources; close them in reverse order on exit. `local_cache`: keep
    a tracked copy of read entries (the API process; API_LOCAL_CACHE_MB)."""
    with tracing.session(settings):
        async with _open_runtime(settings, http_limit, local_cache) as runtime:
            yield runtime


def make_local_cache(settings: Settings, redis: dict[str, RedisClient]) -> LocalCache | None:
    """The API's tracked copy of read entries, or None: off (API_LOCAL_CACHE_MB=0), or the
    tiers are not on single-node FastRedis connections (a Cluster)."""
    hot, warm = redis["hot"], redis["warm"]
    if settings.api_local_cache_mb <= 0 or settings.redis_cluster_mode:
        return None
    if not isinstance(hot, FastRedis) or not isinstance(warm, FastRedis):
        return None
    return LocalCache(settings.api_local_cache_mb * 1024 * 1024, [hot, warm])


@contextlib.asynccontextmanager
async def _open_runtime(
    settings: Settings, http_limit: int, local_cache: bool
) -> AsyncIterator[Runtime]:
    redis = redis_clients(settings)
    local = make_local_cache(settings, redis) if local_cache else None
    if local is not None:
        local.start()
    try:
        session = make_session(http_limit)
        try:
            tokens = ServiceTokens(settings, session)
            timeline = TimelineClient(settings, session, tokens)
            cache = TimelineCache(settings, redis["hot"], redis["warm"], local=local)
            stats = StatsRecorder(redis["background"], settings.metrics_retention_days)
            stats.start()
            try:
                jobs = open_job_queue(settings, queue_client(redis))
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
        if local is not None:
            await local.close()
        for client in {id(c): c for c in redis.values()}.values():
            await client.close()

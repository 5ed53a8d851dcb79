"""A job is bounded by its deadline, and counted once in the stats, as Redis counts it.

Dramatiq's TimeLimit middleware went away with its worker threads: the job deadline
(PREFETCH_JOB_DEADLINE) bounds each user's prefetch instead. The in-memory prefetch stats
(GET /api/prefetch/metrics) count a job only once its outcome is settled in Redis, and only for
the delivery that settled it, so a batch that runs again after Redis refused a write is not
counted twice.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from engine import wire
from engine.broker.jobs import FAILED_KEEP
from engine.store import keys
from engine.store.fastredis import FastRedis
from sandbox.timeline import SLOW_PREFIX  # answered after 60 s
from tests.engine_support import DB_METRICS, Engine, PrivateRedis, user, wait_for


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url) as harness:
        yield harness


@pytest_asyncio.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", "--appendonly", "no")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def failed_jobs(engine: Engine) -> dict[str, wire.FailedJob]:
    return {job.userId: job for job in await engine.jobs.failed(FAILED_KEEP)}


async def failed_listed(engine: Engine, users: list[str]) -> dict[str, wire.FailedJob] | None:
    jobs = await failed_jobs(engine)
    return jobs if all(u in jobs for u in users) else None


async def all_cached(engine: Engine, users: list[str]) -> bool:
    return await engine.count_cached("warm", users) == len(users)


async def queue_empty(engine: Engine) -> bool:
    stats = await engine.jobs.stats()
    busy = stats["waiting"] or stats["active"] or stats["delayed"]
    return not busy and not await engine.acks()


@pytest.mark.timeout(90)
async def test_a_job_past_its_deadline_fails_as_a_timeout_and_is_retried_like_one(
    engine: Engine,
) -> None:
    # The fetch timeout alone would let the sandbox's slow user hold a job slot for 60 s.
    await engine.start_worker(
        PREFETCH_WORKER_COUNT="1",
        PREFETCH_TIMEOUT="120000",
        PREFETCH_JOB_DEADLINE="1000",
        PREFETCH_MAX_ATTEMPTS="2",
        PREFETCH_BACKOFF_MS="200",
    )
    alone, in_batch, fine = user(SLOW_PREFIX), user(SLOW_PREFIX), user()
    await engine.jobs.schedule(alone, "high")
    await engine.jobs.schedule_batch([in_batch, fine], "high")

    # Two attempts of 1 s each and a 0.2 s backoff: far sooner than the sandbox's 60 s.
    failed = await wait_for(
        lambda: failed_listed(engine, [alone, in_batch]), 20, "both slow users failed-listed"
    )
    for slow in (alone, in_batch):
        assert failed[slow].attempts == 2, "retried once, like an upstream timeout"
        assert "deadline of 1000 ms" in failed[slow].failedReason
        assert await engine.fetches(slow) == 2
    assert await engine.count_cached("hot", [fine]) == 1, "the deadline spares a quick job"
    await wait_for(lambda: queue_empty(engine), 10, "an empty queue")
    stats = await engine.jobs.stats()
    assert (stats["completed"], stats["failed"]) == (1, 2)


async def _metrics_total(url: str) -> dict[str, int]:
    async with FastRedis(url, DB_METRICS) as metrics:
        raw = await metrics.execute("HGETALL", keys.METRICS_TOTAL)
    return {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}


@pytest.mark.timeout(120)
async def test_a_batch_run_again_after_redis_refused_a_write_is_counted_once(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    async with Engine.open(tmp_path, private_redis.url) as engine:
        # One job slot: the batch's users run one after the other.
        supervisor = await engine.start_worker(
            PREFETCH_WORKER_COUNT="1",
            PREFETCH_JOB_CONCURRENCY="1",
            PREFETCH_TIMEOUT="2000",
            PREFETCH_MAX_ATTEMPTS="1",
        )
        first, slow, last = user(), user(SLOW_PREFIX), user()
        await engine.jobs.schedule_batch([first, slow, last], "medium")
        await wait_for(lambda: engine.fetches(slow), 10, "the slow user's fetch")
        assert await engine.count_cached("warm", [first]) == 1

        # While the slow fetch waits, Redis starts refusing writes: the last user's store is
        # refused, and the whole message runs again once Redis takes writes.
        info = await engine.queue.execute("INFO", "memory")
        used = int(info.split(b"used_memory:")[1].split()[0])
        await engine.queue.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await engine.queue.execute("CONFIG", "SET", "maxmemory", used // 2)
        try:
            await wait_for(lambda: "it runs again later" in supervisor.log(), 20, "a refused store")
        finally:
            await engine.queue.execute("CONFIG", "SET", "maxmemory", 0)

        await wait_for(lambda: all_cached(engine, [first, last]), 30, "both good users cached")
        await wait_for(lambda: failed_listed(engine, [slow]), 30, "the slow user failed-listed")
        await wait_for(lambda: queue_empty(engine), 30, "an empty queue")
        assert await engine.fetches(first) >= 2, "the batch ran again"
        stats = await engine.jobs.stats()
        assert (stats["completed"], stats["failed"]) == (2, 1)

        os.kill(supervisor.pid, signal.SIGTERM)  # a worker flushes its stats as it stops
        assert await supervisor.wait_exit(30) == 0
        totals = await _metrics_total(private_redis.url)
        assert (totals.get("successful"), totals.get("failed")) == (2, 1), totals
        assert (totals.get("totalJobs"), totals.get("origin:schedule")) == (3, 3), totals

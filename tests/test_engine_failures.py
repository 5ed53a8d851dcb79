"""Nothing is lost when Redis fails: crashes (AOF), refused writes (OOM), a frozen Redis.

Each test runs a redis-server of its own (tests/engine_support.py: PrivateRedis) that it kills,
restarts, starves or freezes while real `prefetch worker` processes run jobs against the
sandbox. The question is always the same: does every accepted job end cached or in the failed
list, with no pending mark left behind to swallow a later schedule?
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import FAILED_KEEP, JobQueue
from engine.broker.worker import EXIT_CONSUMER_DIED, _watch, make_broker, make_worker
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from sandbox.timeline import NOT_FOUND_PREFIX
from tests.engine_support import (
    DB_QUEUE,
    Engine,
    EngineProcess,
    PrivateRedis,
    holds_for,
    user,
    wait_for,
)


@pytest_asyncio.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def plain_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", "--appendonly", "no")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def schedule_all(engine: Engine, users: list[str], priority: str = "medium") -> None:
    for start in range(0, len(users), 200):
        await asyncio.gather(
            *(engine.jobs.schedule(u, priority) for u in users[start : start + 200])
        )


async def completed_at_least(engine: Engine, count: int) -> bool:
    return (await engine.jobs.stats())["completed"] >= count


async def all_cached(engine: Engine, users: list[str], tier: str = "warm") -> bool:
    return await engine.count_cached(tier, users) == len(users)


async def failed_users(engine: Engine) -> set[str]:
    return {job.userId for job in await engine.jobs.failed(FAILED_KEEP)}


async def queue_empty(engine: Engine) -> bool:
    stats = await engine.jobs.stats()
    busy = stats["waiting"] or stats["active"] or stats["delayed"]
    return not busy and not await engine.acks()


async def nothing_pending(engine: Engine, users: list[str]) -> bool:
    replies = await engine.queue.pipeline([("EXISTS", keys.pending_job(u)) for u in users])
    return not any(replies)


def replaced(supervisor: EngineProcess, index: int, old: int) -> int | None:
    pid = supervisor.workers().get(index)
    return pid if pid is not None and pid != old else None


@pytest.mark.timeout(150)
async def test_a_redis_crash_loses_no_accepted_job_and_leaves_no_stale_dedup(
    tmp_path: Path, aof_redis: PrivateRedis, broker_url: str
) -> None:
    async with Engine.open(tmp_path, aof_redis.url, broker_url) as engine:
        await engine.start_sandbox(latency_ms=150)
        supervisor = await engine.start_worker(
            PREFETCH_JOB_CONCURRENCY="20", PREFETCH_BACKOFF_MS="300"
        )
        good = [user() for _ in range(300)]
        missing = [user(NOT_FOUND_PREFIX) for _ in range(10)]
        await schedule_all(engine, good + missing)
        await wait_for(lambda: completed_at_least(engine, 30), 30, "jobs under way")

        aof_redis.kill()  # 2 x 20 jobs in flight, retries and settles among them
        await asyncio.sleep(1.0)  # Redis stays down for a while: pacing, not a wait for a result
        await aof_redis.start()

        await wait_for(lambda: all_cached(engine, good), 90, "every good user cached")
        await wait_for(
            lambda: _eq(failed_users(engine), set(missing)), 30, "every 404 user failed-listed"
        )
        await wait_for(lambda: queue_empty(engine), 30, "an empty queue")
        await wait_for(lambda: nothing_pending(engine, good + missing), 10, "no pending mark")
        stats = await engine.jobs.stats()
        assert stats["failed"] == len(missing), "each failed job recorded once"
        assert stats["completed"] >= len(good)
        assert stats["dead"] == len(missing), "the failed jobs' messages are dead-lettered"
        # No stale mark answers `deduplicated` for a job that no longer exists.
        again = await asyncio.gather(*(engine.jobs.schedule(u, "medium") for u in good[:50]))
        assert not any(s.deduplicated for s in again)
        assert supervisor.proc.poll() is None


@pytest.mark.timeout(120)
async def test_redis_refusing_writes_delays_jobs_loses_none_and_kills_no_consumer(
    tmp_path: Path, plain_redis: PrivateRedis, broker_url: str
) -> None:
    async with Engine.open(tmp_path, plain_redis.url, broker_url) as engine:
        await engine.start_sandbox(latency_ms=200)
        supervisor = await engine.start_worker(PREFETCH_JOB_CONCURRENCY="10")
        workers = supervisor.workers()
        delayed = user()
        await engine.jobs.schedule(delayed, "high", delay_ms=1_000)
        users = [user() for _ in range(120)]
        await schedule_all(engine, users)
        await wait_for(lambda: completed_at_least(engine, 10), 30, "jobs under way")

        used = int(
            (await engine.queue.execute("INFO", "memory")).split(b"used_memory:")[1].split()[0]
        )
        await engine.queue.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await engine.queue.execute("CONFIG", "SET", "maxmemory", used // 2)
        # Under OOM nothing is stored; the delayed job falls due meanwhile.
        await holds_for(
            lambda: _not(engine.count_cached("hot", [delayed])), 2.5, "no write while OOM"
        )
        await engine.queue.execute("CONFIG", "SET", "maxmemory", 0)

        await wait_for(lambda: all_cached(engine, users), 60, "every job after the OOM")
        await wait_for(lambda: all_cached(engine, [delayed], "hot"), 30, "the delayed job")
        await wait_for(lambda: queue_empty(engine), 30, "an empty queue")
        await wait_for(lambda: nothing_pending(engine, [*users, delayed]), 10, "no pending mark")
        stats = await engine.jobs.stats()
        assert (stats["failed"], stats["dead"]) == (0, 0)
        # The consumers survived the error replies: no worker had to be replaced.
        assert supervisor.workers() == workers


@pytest.mark.timeout(120)
async def test_a_worker_is_replaced_while_redis_is_frozen_and_its_jobs_come_back_later(
    tmp_path: Path, plain_redis: PrivateRedis, broker_url: str
) -> None:
    async with Engine.open(tmp_path, plain_redis.url, broker_url) as engine:
        await engine.start_sandbox(latency_ms=1_500)
        supervisor = await engine.start_worker(
            PREFETCH_WORKER_COUNT="1", PREFETCH_JOB_CONCURRENCY="5"
        )
        users = [user() for _ in range(20)]
        await schedule_all(engine, users)
        await wait_for(lambda: _held(engine), 10, "the worker to hold messages")
        victim = supervisor.workers()[1]

        plain_redis.freeze()
        try:
            os.kill(victim, signal.SIGKILL)
            await wait_for(partial(replaced, supervisor, 1, victim), 10, "a new worker 1")
            log = supervisor.log()
            restarted_at = log.index("restarting in")
            assert "could not requeue" not in log[:restarted_at], "the restart waited for Redis"
        finally:
            plain_redis.thaw()

        await wait_for(lambda: all_cached(engine, users), 60, "every job, the dead one's too")
        await wait_for(lambda: queue_empty(engine), 30, "an empty queue")


@pytest.mark.timeout(120)
async def test_a_queue_on_a_redis_of_its_own_loses_nothing_when_a_worker_dies(
    tmp_path: Path, redis_url: str, plain_redis: PrivateRedis
) -> None:
    # BROKER_URL=redis://...: messages, marks, counters and hand-backs on that Redis; the
    # entries on the cache's.
    async with Engine.open(tmp_path, redis_url) as engine:
        queue = FastRedis(plain_redis.url, DB_QUEUE)
        jobs = JobQueue(queue)
        try:
            await engine.start_sandbox(latency_ms=100)
            supervisor = await engine.start_worker(
                ready=False, BROKER_URL=plain_redis.url, PREFETCH_JOB_CONCURRENCY="20"
            )

            async def consuming() -> bool:
                beats = await queue.execute(
                    "ZRANGE", keys.QUEUE_NAMESPACE + ":__heartbeats__", 0, -1
                )
                return len({b.decode().split(":")[-2] for b in beats}) == 2

            await wait_for(consuming, 20, "two workers consuming the broker's Redis")
            users = [user() for _ in range(300)]
            for start in range(0, len(users), 100):
                await asyncio.gather(
                    *(jobs.schedule(u, "medium") for u in users[start : start + 100])
                )
            await wait_for(lambda: _completed(jobs, 30), 30, "jobs under way")
            victim = supervisor.workers()[1]
            os.kill(victim, signal.SIGKILL)
            await wait_for(partial(replaced, supervisor, 1, victim), 10, "a new worker 1")

            await wait_for(lambda: all_cached(engine, users), 60, "every job")

            async def drained() -> bool:
                stats = await jobs.stats()
                acks = await queue.execute("KEYS", layout.acks_pattern())
                return not (stats["waiting"] or stats["active"] or stats["delayed"] or acks)

            await wait_for(drained, 20, "an empty queue on the broker's Redis")
            assert (await jobs.stats())["completed"] >= len(users)
            pending = await queue.pipeline([("EXISTS", keys.pending_job(u)) for u in users])
            assert not any(pending)
            # Nothing of the queue in the cache's queue DB.
            assert await engine.queue.execute("KEYS", "prefetch:queue:*") == []
            assert await engine.queue.execute("KEYS", "prefetch:jobs:*") == []
        finally:
            await queue.close()


async def _completed(jobs: JobQueue, count: int) -> bool:
    return int((await jobs.stats())["completed"]) >= count


async def test_a_worker_whose_consumer_thread_died_exits_to_be_replaced(
    tmp_path: Path, redis_url: str, broker_url: str
) -> None:
    async with Engine.open(tmp_path, redis_url, broker_url):
        settings = Settings().with_overrides(
            redis_url=redis_url, db_queue=DB_QUEUE, broker_url=broker_url
        )
        broker, _, _ = make_broker(settings, f"test:{os.getpid()}:1:1")
        worker = make_worker(settings, broker)
        worker.start()
        try:
            consumer = worker.consumers["medium"]
            consumer.stop()
            await asyncio.to_thread(consumer.join, 10)
            assert not consumer.is_alive()
            code = await asyncio.wait_for(_watch(worker, asyncio.Event()), 10)
            assert code == EXIT_CONSUMER_DIED
        finally:
            await asyncio.to_thread(worker.stop, 1_000)
            broker.close()


async def _held(engine: Engine) -> bool:
    return bool(await engine.acks())


async def _eq(awaitable: object, expected: object) -> bool:
    return await awaitable == expected  # type: ignore[misc]


async def _not(awaitable: object) -> bool:
    return not await awaitable  # type: ignore[misc]

"""How bench_prefetch puts its jobs on the queue and sees them done.

Three ways in (`--mode`): JobQueue.schedule from this process, JobQueue.schedule_batch, or
POST /api/prefetch/schedule over HTTP; then the queue's `completed` counter is polled until
every job is done or the run stalls. `drive` holds the clock for the engine's runs and its
warm-up, so every mode is timed the same way: from the first schedule (or, with the workers
held back, from their release) to the last completion.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp

from bench.common import BENCH_DBS, SERVICE_TOKEN
from engine.broker.backend import open_job_queue
from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis

SCHEDULE_CHUNK = 500
POLL_S = 0.05
STALL_S = 30.0
PRIORITY = "medium"  # medium lands in the warm tier


# --- scheduling -------------------------------------------------------------------------------


async def schedule_single(queue: JobQueue, users: list[str]) -> int:
    for start in range(0, len(users), SCHEDULE_CHUNK):
        chunk = users[start : start + SCHEDULE_CHUNK]
        await asyncio.gather(*(queue.schedule(user, PRIORITY) for user in chunk))
    return 0


async def schedule_batch(queue: JobQueue, users: list[str], batch_size: int) -> int:
    batches = [users[i : i + batch_size] for i in range(0, len(users), batch_size)]
    for start in range(0, len(batches), SCHEDULE_CHUNK):
        chunk = batches[start : start + SCHEDULE_CHUNK]
        await asyncio.gather(*(queue.schedule_batch(batch, PRIORITY) for batch in chunk))
    return 0


async def schedule_api(base: str, users: list[str], concurrency: int) -> int:
    """POST every user's schedule over HTTP; returns how many answers were not 202."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}", "Content-Type": "application/json"}
    body = b'{"priority":"medium"}'
    pending = iter(users)
    bad = 0
    first_error: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post_all() -> None:
            nonlocal bad
            for user in pending:
                url = f"{base}/api/prefetch/schedule/{user}"
                try:
                    async with session.post(url, data=body, headers=headers) as rsp:
                        text = await rsp.read()
                        if rsp.status != 202:
                            bad += 1
                            first_error[:] = first_error or [f"{rsp.status} {text[:200]!r}"]
                except aiohttp.ClientError as exc:
                    bad += 1
                    first_error[:] = first_error or [repr(exc)]

        await asyncio.gather(*(post_all() for _ in range(concurrency)))
    if first_error:
        print(f"  ! {bad} schedule requests failed; first: {first_error[0]}")
    return bad


# --- completion -------------------------------------------------------------------------------


def broker_settings() -> Settings:
    """The queue's backend as the workers are told it: BROKER_URL from the environment
    (passed on to them), on RabbitMQ or another Redis; unset, the cache's Redis."""
    return Settings().with_overrides(broker_url=os.environ.get("BROKER_URL", ""))


def queue_url(url: str) -> str:
    """Where the queue role's Redis is, as the workers are told: a Redis BROKER_URL (the
    bench's queue DB unless it names one), else the cache's `url`."""
    broker = broker_settings()
    return broker.queue_redis_url if broker.broker_kind == "redis" and broker.broker_url else url


class Progress:
    """Reads how many jobs are done: the completed counter, or the number of warm entries."""

    def __init__(self, url: str, by_entries: bool) -> None:
        self._url = url
        self._by_entries = by_entries
        self.queue: FastRedis | None = None
        self.warm: FastRedis | None = None

    async def open(self) -> None:
        self.queue = await FastRedis.connect(queue_url(self._url), BENCH_DBS["REDIS_DB_QUEUE"])
        self.warm = await FastRedis.connect(self._url, BENCH_DBS["REDIS_DB_WARM"])

    async def close(self) -> None:
        for client in (self.queue, self.warm):
            if client is not None:
                await client.close()

    async def read(self) -> tuple[int, int, int]:
        """(done by this run's measure, completed counter, failed counter)."""
        assert self.queue is not None and self.warm is not None
        completed, failed = await self.queue.pipeline(
            [("GET", keys.JOBS_COMPLETED), ("GET", keys.JOBS_FAILED)]
        )
        completed, failed = int(completed or 0), int(failed or 0)
        done = await self.warm.execute("DBSIZE") if self._by_entries else completed
        return int(done), completed, failed

    async def wait(self, target: int, timeout: float) -> tuple[int, int, float]:
        """Poll until `done` reaches `target`; return (done, failed, when) at the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_change, last_done = loop.time(), -1
        while True:
            done, _, failed = await self.read()
            now = loop.time()
            if done >= target or (done + failed >= target and not self._by_entries):
                return done, failed, time.perf_counter()
            if done != last_done:
                last_change, last_done = now, done
            if now - last_change > STALL_S or now > deadline:
                print(f"  ! stalled at {done}/{target} done, {failed} failed")
                return done, failed, time.perf_counter()
            await asyncio.sleep(POLL_S)


def schedule_fn(
    args: argparse.Namespace, api_base: str | None
) -> Callable[[JobQueue, list[str]], Awaitable[int]]:
    if args.mode == "single":
        return schedule_single
    if args.mode == "batch":
        return lambda queue, users: schedule_batch(queue, users, args.batch_size)
    assert api_base is not None
    return lambda queue, users: schedule_api(api_base, users, args.api_concurrency)


async def drive(
    url: str,
    users: list[str],
    args: argparse.Namespace,
    api_base: str | None,
    release: Callable[[], None] | None = None,
) -> tuple[int, int, float, float]:
    """Schedule `users` and wait for them; returns (done, failed, schedule s, total s).

    With `release` (workers held back while everything is enqueued), the clock starts when
    it returns, after the scheduling.
    """
    progress = Progress(url, by_entries=False)
    await progress.open()
    queue_redis = await FastRedis.connect(queue_url(url), BENCH_DBS["REDIS_DB_QUEUE"])
    try:
        done0, _, failed0 = await progress.read()
        schedule = schedule_fn(args, api_base)
        jobs = open_job_queue(broker_settings(), queue_redis)
        started = time.perf_counter()
        try:
            await schedule(jobs, users)
        finally:
            await jobs.close()
        scheduled = time.perf_counter()
        schedule_s = scheduled - started
        if release is not None:
            release()
            started = time.perf_counter()
        timeout = max(120.0, len(users) / 50)
        done, failed, ended = await progress.wait(done0 + len(users), timeout)
        return done - done0, failed - failed0, schedule_s, ended - started
    finally:
        await queue_redis.close()
        await progress.close()

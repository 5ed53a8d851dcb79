"""The engine side of bench_prefetch: `prefetch worker` (and `prefetch api`) started,
warmed up, measured and stopped.

The workers' CPU time, the sandbox's and Redis's are read from /proc around the run, and
with `--enqueue-first` the workers are held (SIGSTOP) while every job is enqueued, as the
peers' runs do, so the clock measures the workers and not the scheduling. The run ends with
the worker's exit code and the error lines of its log, because a run whose workers crashed
or restarted is not a figure to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import uvloop

from bench.common import (
    SERVICE_TOKEN,
    Service,
    Services,
    free_port,
    http_json,
    local_redis_pid,
    service_env,
    wait_http,
)
from bench.prefetch_load import drive, queue_url
from bench.prefetch_run import WARMUP_JOBS, Run, fresh_users, verify_entries
from bench.procfs import cpu_seconds, memory_kb, system_busy_seconds, titled


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
    queue = queue_url(url)
    queue_pid = local_redis_pid(queue) if queue != url else None
    if queue_pid:  # a Redis BROKER_URL on this machine: the queue's own CPU
        roles["queue redis"] = [queue_pid]
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

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

Here: the command line and the services. The parts: soak_redis.py (the Redis it kills),
soak_load.py (the load and the chaos) and soak_verdict.py (the drain and the audit).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import uvloop

from bench.common import (
    SERVICE_TOKEN,
    Services,
    free_port,
    machine,
    save_result,
    service_env,
    start_sandbox,
    wait_http,
)
from bench.soak_load import drive
from bench.soak_redis import CrashableRedis
from bench.soak_verdict import audit, converge, report


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

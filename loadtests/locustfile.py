"""Locust load test of a running exprsn-prefetch API (see loadtests/README.md).

Each simulated client reads timelines (90%), asks for cache status (5%) and schedules
prefetches with a random priority (5%), for user ids drawn from a pool. The first read of a
user that nobody prefetched goes through to the timeline service (`meta.cached: false`);
later reads are cache hits.

Environment:
    LOCUST_USERS         user ids: a file with one id per line, or ids separated by commas
                         or spaces (default: 1000 uuid4s generated at start)
    PREFETCH_TOKEN       bearer token (default: sandbox-service, which `prefetch dev` accepts)
    LOAD_MAX_ERROR_RATE  the run fails (exit 1) above this share of failed requests (0.01)
    LOAD_P99_MS          ... or above this p99 latency over all requests, in ms (100)

    locust -f loadtests/locustfile.py --headless -u 64 -r 16 -t 60s --host http://127.0.0.1:3005
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from loadtests.thresholds import Bounds, verdict

PRIORITIES = ("high", "medium", "low")
DEFAULT_POOL = 1000


def user_pool() -> list[str]:
    """The user ids of LOCUST_USERS, or DEFAULT_POOL fresh ones."""
    raw = os.environ.get("LOCUST_USERS", "").strip()
    if not raw:
        return [str(uuid.uuid4()) for _ in range(DEFAULT_POOL)]
    path = Path(raw)
    text = path.read_text() if path.is_file() else raw
    ids = [item for item in text.replace(",", " ").split() if item]
    if not ids:
        raise SystemExit(f"LOCUST_USERS={raw!r} holds no user ids")
    return ids


USERS = user_pool()
TOKEN = os.environ.get("PREFETCH_TOKEN", "sandbox-service")
try:
    BOUNDS = Bounds.from_env(os.environ)
except ValueError as exc:
    raise SystemExit(f"loadtests: {exc}") from None


@events.quitting.add_listener
def judge(environment: Environment, **_: object) -> None:
    """Replace locust's exit code (1 on any failure at all) by the verdict on the bounds."""
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0.0
    problems = verdict(total.num_requests, total.num_failures, p99, BOUNDS)
    summary = (
        f"{total.num_requests} requests, {total.num_failures} failed, p99 {p99:g} ms "
        f"(bounds: error rate {BOUNDS.max_error_rate:.2%}, p99 {BOUNDS.max_p99_ms:g} ms)"
    )
    if problems:
        print(f"load: FAILED: {'; '.join(problems)}: {summary}", flush=True)
        environment.process_exit_code = 1
    else:
        print(f"load: passed: {summary}", flush=True)
        environment.process_exit_code = 0


class TimelineClient(FastHttpUser):
    """A client of the API: mostly cached reads, some status checks and schedules."""

    wait_time = constant(0)  # closed loop: each simulated client sends as fast as it is served
    default_headers = {"Authorization": f"Bearer {TOKEN}", "Accept-Encoding": "gzip"}

    @task(90)
    def read_timeline(self) -> None:
        user = random.choice(USERS)
        self.client.get(f"/api/cache/{user}", name="GET /api/cache/[userId]")

    @task(5)
    def cache_status(self) -> None:
        user = random.choice(USERS)
        self.client.get(f"/api/cache/status/{user}", name="GET /api/cache/status/[userId]")

    @task(5)
    def schedule_prefetch(self) -> None:
        user = random.choice(USERS)
        with self.client.post(
            f"/api/prefetch/schedule/{user}",
            json={"priority": random.choice(PRIORITIES)},
            name="POST /api/prefetch/schedule/[userId]",
            catch_response=True,
        ) as response:
            if response.status_code != 202:
                response.failure(f"expected 202, got {response.status_code}")

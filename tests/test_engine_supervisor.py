"""`prefetch worker` as operators run it: children killed, signals, drains, config errors.

Real supervisor and worker processes (tests/engine_support.py), found by their titles
(`prefetch: supervisor`, `prefetch: worker N`), killed with real signals.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engine.store import keys
from engine.supervisor import EXIT_KILLED, EXIT_OK
from sandbox.timeline import SLOW_PREFIX  # answered after 60 s
from tests.conftest import closed_port
from tests.engine_support import (
    DB_QUEUE,
    Engine,
    EngineProcess,
    alive,
    clean_env,
    user,
    wait_for,
)


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str, broker_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url, broker_url) as harness:
        yield harness


async def schedule_all(engine: Engine, users: list[str], priority: str = "medium") -> None:
    for start in range(0, len(users), 500):
        await asyncio.gather(
            *(engine.jobs.schedule(u, priority) for u in users[start : start + 500])
        )


async def completed(engine: Engine, at_least: int) -> dict[str, Any] | None:
    stats = await engine.jobs.stats()
    return stats if stats["completed"] >= at_least else None


async def held_by(engine: Engine, process: EngineProcess, index: int) -> int:
    """How many messages worker `index` of this supervisor holds unacked."""
    marker = f":{process.pid}:{index}:"
    return sum(size for name, size in (await engine.acks()).items() if marker in name)


async def queue_empty(engine: Engine) -> bool:
    """Nothing waiting, delayed or unacknowledged."""
    stats = await engine.jobs.stats()
    busy = stats["waiting"] or stats["active"] or stats["delayed"]
    return not busy and not await engine.acks()


def replaced(supervisor: EngineProcess, index: int, old: int) -> int | None:
    """The pid of worker `index` if it is not `old` any more."""
    pid = supervisor.workers().get(index)
    return pid if pid != old else None


async def all_cached(engine: Engine, users: list[str], tier: str = "warm") -> bool:
    return await engine.count_cached(tier, users) == len(users)


async def fetch_counts(engine: Engine, users: list[str]) -> list[int]:
    by_user = (await engine.sandbox_stats())["byUser"]
    return [by_user.get(u, 0) for u in users]


async def nothing_pending(engine: Engine, users: list[str]) -> bool:
    replies = await engine.queue.pipeline([("EXISTS", keys.pending_job(u)) for u in users])
    return not any(replies)


@pytest.mark.timeout(90)
async def test_a_sigkilled_worker_is_replaced_and_its_jobs_are_done_by_others(
    engine: Engine,
) -> None:
    await engine.start_sandbox(latency_ms=100)
    supervisor = await engine.start_worker(PREFETCH_JOB_CONCURRENCY="20")
    users = [user() for _ in range(600)]
    await schedule_all(engine, users)
    await wait_for(lambda: completed(engine, 60), 15, "jobs under way")
    await wait_for(lambda: held_by(engine, supervisor, 1), 5, "worker 1 to hold jobs")

    victim = supervisor.workers()[1]
    survivor = supervisor.workers()[2]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replacement = await wait_for(
        partial(replaced, supervisor, 1, victim),
        10.0,
        "a new `prefetch: worker 1`",
        interval=0.02,
    )
    print(f"worker 1 replaced after {time.monotonic() - killed_at:.2f}s")
    assert replacement != victim and not alive(victim)
    assert supervisor.workers()[2] == survivor
    assert supervisor.proc.poll() is None

    await wait_for(lambda: all_cached(engine, users), 30, "every job of the backlog")
    await wait_for(lambda: nothing_pending(engine, users), 5, "every pending mark cleared")
    # The dead worker's messages were handed back (a job it finished without acknowledging
    # runs again), and in the end nobody holds or waits for any.
    await wait_for(lambda: queue_empty(engine), 10, "an empty queue")
    stats = await engine.jobs.stats()
    assert (stats["failed"], stats["delayed"]) == (0, 0)
    assert stats["completed"] >= len(users)
    counts = await fetch_counts(engine, users)
    assert min(counts) >= 1 and max(counts) <= 2, "at least once, at most twice"
    assert engine.error_lines() == []


@pytest.mark.timeout(90)
async def test_sigterm_drains_in_flight_jobs_and_hands_back_the_rest(engine: Engine) -> None:
    await engine.start_sandbox(latency_ms=300)
    supervisor = await engine.start_worker(
        PREFETCH_JOB_CONCURRENCY="10", PREFETCH_SHUTDOWN_TIMEOUT="10000"
    )
    workers = set(supervisor.workers().values())
    users = [user() for _ in range(200)]
    await schedule_all(engine, users)
    await wait_for(lambda: completed(engine, 20), 15, "jobs under way")
    assert await held_by(engine, supervisor, 1) + await held_by(engine, supervisor, 2) > 0

    os.kill(supervisor.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    code = await supervisor.wait_exit(10)
    took = time.monotonic() - stopped_at
    print(f"supervisor exited {code} after {took:.2f}s")
    assert code == EXIT_OK
    assert not [pid for pid in workers if alive(pid)]

    # Nothing held by a stopped worker; every job is either done or back in the queue.
    assert await engine.acks() == {}
    done = await engine.count_cached("warm", users)
    stats = await engine.jobs.stats()
    assert 20 <= done < len(users), "the signal came while jobs were in flight"
    assert stats["waiting"] == len(users) - done
    assert (stats["failed"], stats["delayed"]) == (0, 0)
    counts = await fetch_counts(engine, users)
    assert sum(1 for c in counts if c) == done, "every started job was finished, none dropped"

    await engine.start_worker(PREFETCH_JOB_CONCURRENCY="10", PREFETCH_SHUTDOWN_TIMEOUT="10000")
    await wait_for(lambda: all_cached(engine, users), 30, "every job after the restart")
    await wait_for(lambda: nothing_pending(engine, users), 5, "every pending mark cleared")
    await wait_for(lambda: queue_empty(engine), 10, "an empty queue")
    counts = await fetch_counts(engine, users)
    assert min(counts) >= 1 and max(counts) <= 2, "at least once, at most twice"
    assert engine.error_lines() == []


async def test_a_graceful_stop_saves_the_metrics_counted_since_the_last_flush(
    engine: Engine,
) -> None:
    # Metrics in the queue DB (every role in one DB is a supported layout), which this test
    # owns; workers flush their tallies every second, and at shutdown.
    supervisor = await engine.start_worker(REDIS_DB_METRICS=str(DB_QUEUE))
    users = [user() for _ in range(50)]
    await schedule_all(engine, users)
    await wait_for(lambda: completed(engine, len(users)), 10, "every job")
    os.kill(supervisor.pid, signal.SIGTERM)
    assert await supervisor.wait_exit(10) == EXIT_OK

    total = await engine.queue.execute("HGET", keys.METRICS_TOTAL, "totalJobs")
    assert int(total or 0) == len(users)
    assert engine.error_lines() == []


async def test_sigterm_waits_for_every_job_in_flight_within_the_shutdown_timeout(
    engine: Engine,
) -> None:
    # 100 jobs of 2 s each, started over one second, on the 100 threads of one worker: the
    # drain must last until the last of them ends, not as long as a budget that shrinks with
    # every thread joined.
    await engine.start_sandbox(latency_ms=2_000)
    supervisor = await engine.start_worker(
        PREFETCH_WORKER_COUNT="1", PREFETCH_SHUTDOWN_TIMEOUT="10000"
    )
    users = [user() for _ in range(100)]
    for start in range(0, len(users), 10):
        await schedule_all(engine, users[start : start + 10])
        await asyncio.sleep(0.1)  # pacing the load, not waiting for a result
    await wait_for(
        lambda: _when_all_fetched(engine, users), 5, "every fetch to start", interval=0.02
    )

    os.kill(supervisor.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    assert await supervisor.wait_exit(10) == EXIT_OK
    took = time.monotonic() - stopped_at
    print(f"drained in {took:.2f}s")
    assert took >= 1.0, f"exited after {took:.2f}s: it did not wait for the jobs"
    assert await engine.count_cached("warm", users) == len(users), "every job was drained"
    assert await queue_empty(engine)
    assert (await engine.jobs.stats())["completed"] == len(users)
    assert await fetch_counts(engine, users) == [1] * len(users)
    assert engine.error_lines() == []


async def _when_all_fetched(engine: Engine, users: list[str]) -> bool:
    return all(await fetch_counts(engine, users))


async def test_a_job_past_the_shutdown_timeout_goes_back_to_the_queue(engine: Engine) -> None:
    supervisor = await engine.start_worker(
        PREFETCH_WORKER_COUNT="1", PREFETCH_SHUTDOWN_TIMEOUT="1000"
    )
    slow = user(SLOW_PREFIX)
    await engine.jobs.schedule(slow, "high")
    await wait_for(lambda: engine.fetches(slow), 5, "the slow fetch to start")

    os.kill(supervisor.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    assert await supervisor.wait_exit(8) == EXIT_OK
    took = time.monotonic() - stopped_at
    print(f"exited {took:.2f}s after SIGTERM")
    assert took >= 1.0, f"exited after {took:.2f}s: it did not wait for the slow job"

    stats = await engine.jobs.stats()
    # Handed back as it was: not counted as a failed attempt, no retry scheduled.
    assert (stats["waiting"], stats["delayed"], stats["failed"]) == (1, 0, 0)
    assert await engine.acks() == {}
    assert await engine.jobs.failed(10) == []
    assert await engine.queue.execute("EXISTS", keys.pending_job(slow)) == 1


async def test_a_second_signal_kills_at_once_and_loses_nothing(engine: Engine) -> None:
    supervisor = await engine.start_worker(PREFETCH_WORKER_COUNT="1")
    worker = supervisor.workers()[1]
    slow = user(SLOW_PREFIX)
    await engine.jobs.schedule(slow, "high")
    await wait_for(lambda: engine.fetches(slow), 5, "the slow fetch to start")

    os.kill(supervisor.pid, signal.SIGTERM)
    await wait_for(lambda: "draining" in supervisor.log(), 5, "the drain to start")
    os.kill(supervisor.pid, signal.SIGTERM)
    # The slow fetch answers after 60 s: an exit well before that did not drain it.
    assert await supervisor.wait_exit(20) == EXIT_KILLED
    assert not alive(worker)

    stats = await engine.jobs.stats()
    assert (stats["waiting"], stats["failed"]) == (1, 0), "the killed job is back in the queue"
    assert await engine.acks() == {}


@pytest.mark.timeout(90)
async def test_a_crash_looping_worker_is_restarted_with_growing_delays(engine: Engine) -> None:
    supervisor = await engine.start_worker(PREFETCH_WORKER_COUNT="1")
    previous = supervisor.workers()[1]
    gaps = []
    for _ in range(3):
        os.kill(previous, signal.SIGKILL)
        killed_at = time.monotonic()
        previous = await wait_for(
            partial(replaced, supervisor, 1, previous),
            5,
            "worker 1 to be restarted",
            interval=0.01,
        )
        gaps.append(time.monotonic() - killed_at)
        assert supervisor.proc.poll() is None, "the supervisor survives its children"
    print("restart delays: " + ", ".join(f"{gap:.2f}s" for gap in gaps))
    # Backoff for a child that dies young: 0.5 s, then 1 s, then 2 s (plus the time a child
    # takes to start and name itself, which a busy machine stretches).
    delays = re.findall(
        r"worker 1 \(pid \d+\) died with -9 .*; restarting in ([\d.]+)s", supervisor.log()
    )
    assert delays == ["0.5", "1.0", "2.0"]
    for gap, expected in zip(gaps, (0.5, 1.0, 2.0), strict=True):
        assert gap >= expected - 0.05, f"restarted {gap:.2f}s after the kill, before its delay"

    # The last one is left alone, and serves jobs.
    await engine.wait_ready(supervisor, 1)
    uid = user()
    await engine.jobs.schedule(uid, "high")
    await wait_for(lambda: engine.count_cached("hot", [uid]), 10, "a job after the crash loop")
    assert supervisor.workers()[1] == previous
    assert engine.error_lines() == []


def test_a_malformed_worker_count_stops_the_supervisor_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefetch.cli", "worker"],
        env=clean_env(PREFETCH_WORKER_COUNT="abc"),
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "PREFETCH_WORKER_COUNT" in stderr
    assert "abc" in stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""


_RECOVERY_IMPORTS = """
import logging, sys, threading
from engine.settings import Settings
from engine.supervisor import Recovery
live, dead = sys.argv[1], sys.argv[2]
failed = threading.Event()

class Failed(logging.Handler):
    def emit(self, record):
        if "could not requeue" in record.getMessage():
            failed.set()

logging.getLogger("engine.supervisor").addHandler(Failed())
before = set(sys.modules)
up = Recovery(Settings().with_overrides(redis_url=live, db_queue=14))
up.submit(1, "fork-safety:1:1:1")
assert up.wait_idle(10)
down = Recovery(Settings().with_overrides(redis_url=dead, db_queue=14))
down.submit(1, "fork-safety:1:1:1")
assert failed.wait(30), "no failed hand-back was logged"
print(sorted(set(sys.modules) - before))
"""


def test_the_recovery_thread_imports_nothing_that_a_fork_could_catch_half_done(
    redis_url: str,
) -> None:
    # The supervisor forks replacements while its recovery thread hands a dead worker's
    # messages back. A module that thread imports at the moment of a fork stays half-imported
    # in the child for good: a replacement worker once failed every connection with
    # "unknown encoding: idna". So the supervisor imports all of it up front.
    closed = f"redis://127.0.0.1:{closed_port()}"
    found = subprocess.run(
        [sys.executable, "-c", _RECOVERY_IMPORTS, redis_url, closed],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert found.stdout.strip() == "[]", found.stdout

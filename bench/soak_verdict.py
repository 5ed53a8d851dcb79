"""The chaos soak's verdict: the queue drained, every accepted job accounted for.

After the load the queue must empty (nothing waiting, running, delayed or unacknowledged);
then every accepted job's user must be cached, or (the users the sandbox answers 404 for)
in the failed list. Anything else is a lost job, and the soak fails on it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis as redis_py
import redis.asyncio as aredis

from bench.common import BENCH_DBS
from bench.soak_load import Tally
from engine.store import keys

CONVERGE_S = 180.0


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

"""What Redis says after the run: the queue drained, every job's outcome, who enqueued when.

- `drained`: waits until nothing waits, runs, is delayed or sits unacknowledged, and stays so
  for a while (a retry falls due meanwhile; a dead pod's unacknowledged messages are handed
  back by the heartbeat maintenance of the live workers, 15 s after its last beat).
- `jobs`: every accepted schedule has its user cached (either tier), or, for users the
  sandbox answers 404, in the failed list; every user whose activity was recorded was
  prefetched by the strategy leader. Anything else is lost.
- `leases`: the fenced-enqueue log (keys.FENCED_ENQUEUES, written by the enqueue script on
  Redis's clock) grouped by lease: each lease's enqueues must all come before the next
  lease's first one (never two leaders enqueuing in the same interval).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import QUEUES
from engine.store import keys
from engine.store.fastredis import FastRedis
from engine.strategies.leader import FencedEnqueue, fenced_enqueues

IDLE_FOR_S = 2.0


@dataclass
class Redis:
    """The driver's connections to the Redis host, one per DB it reads."""

    hot: FastRedis
    warm: FastRedis
    queue: FastRedis

    @classmethod
    def open(cls, url: str, dbs: tuple[int, int, int]) -> Redis:
        hot, warm, queue = dbs
        return cls(FastRedis(url, hot), FastRedis(url, warm), FastRedis(url, queue))

    async def close(self) -> None:
        for client in (self.hot, self.warm, self.queue):
            await client.close()


async def _queue_idle(queue: FastRedis) -> bool:
    names = layout.all_queues(list(QUEUES.values()))
    commands: list[tuple[str | int, ...]] = []
    for name in names:
        commands += [("LLEN", layout.queue_key(name)), ("HLEN", layout.messages_key(name))]
    if any(await queue.pipeline(commands)):
        return False
    cursor = b"0"
    while True:
        cursor, found = await queue.execute("SCAN", cursor, "MATCH", layout.acks_pattern())
        for key in found:
            if await queue.execute("SCARD", key):
                return False
        if cursor == b"0":
            return True


async def drained(queue: FastRedis, timeout: float) -> float | None:
    """Seconds until the queue was idle for IDLE_FOR_S, or None if not within `timeout`."""
    started = time.monotonic()
    idle_since: float | None = None
    while time.monotonic() - started < timeout:
        now = time.monotonic()
        if await _queue_idle(queue):
            idle_since = idle_since or now
            if now - idle_since >= IDLE_FOR_S:
                return idle_since - started
        else:
            idle_since = None
        await asyncio.sleep(0.25)
    return None


async def _cached(redis: Redis, users: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(users), 500):
        chunk = users[start : start + 500]
        hot = await redis.hot.pipeline([("EXISTS", keys.timeline("hot", u)) for u in chunk])
        warm = await redis.warm.pipeline([("EXISTS", keys.timeline("warm", u)) for u in chunk])
        found.update(u for u, h, w in zip(chunk, hot, warm, strict=True) if h == 1 or w == 1)
    return found


async def jobs(
    redis: Redis, accepted: dict[str, str], failing: set[str], activity_users: set[str]
) -> dict[str, Any]:
    """Every accepted job and every recorded activity user: where it ended."""
    good = sorted(set(accepted) - failing)
    cached = await _cached(redis, good)
    records = await redis.queue.execute("LRANGE", keys.FAILED_JOBS, 0, -1)
    failed_users = {json.loads(raw)["userId"] for raw in records}
    active = sorted(activity_users)
    active_cached = await _cached(redis, active)
    lost = sorted(set(good) - cached) + sorted(failing - failed_users)
    return {
        "jobs_accepted": len(accepted),
        "jobs_cached": len(cached),
        "jobs_failed_listed": len(failing & failed_users),
        "jobs_lost": len(lost),
        "lost_sample": lost[:10],
        "activity_users": len(active),
        "activity_users_cached": len(active_cached),
        "activity_users_missing": sorted(set(active) - active_cached)[:10],
        "completed_total": int(await redis.queue.execute("GET", keys.JOBS_COMPLETED) or 0),
    }


@dataclass(frozen=True, slots=True)
class LeaseSpan:
    """The enqueues one lease made: its token, holder and first and last Redis times."""

    token: int
    identity: str
    first_ms: int
    last_ms: int
    enqueues: int


def lease_spans(log: list[FencedEnqueue]) -> list[LeaseSpan]:
    """The fenced-enqueue log grouped by lease, in the order of their first enqueue."""
    spans: dict[int, LeaseSpan] = {}
    for entry in log:
        span = spans.get(entry.token)
        if span is None:
            spans[entry.token] = LeaseSpan(entry.token, entry.identity, entry.at_ms, entry.at_ms, 1)
        else:
            spans[entry.token] = LeaseSpan(
                span.token,
                span.identity,
                min(span.first_ms, entry.at_ms),
                max(span.last_ms, entry.at_ms),
                span.enqueues + 1,
            )
    return sorted(spans.values(), key=lambda span: (span.first_ms, span.token))


def overlaps(spans: list[LeaseSpan]) -> list[str]:
    """Pairs of leases whose enqueues interleave, or that ran against token order."""
    found: list[str] = []
    for before, after in itertools.pairwise(spans):
        if after.first_ms < before.last_ms or after.token < before.token:
            found.append(
                f"lease {before.token} ({before.identity}) enqueued until {before.last_ms}, "
                f"lease {after.token} ({after.identity}) from {after.first_ms}"
            )
    return found


async def leases(queue: FastRedis) -> dict[str, Any]:
    """The enqueue log by lease, the overlaps found, and the ticks each identity ran."""
    log = await fenced_enqueues(queue)
    spans = lease_spans(log)
    ticks = await queue.execute("HGETALL", keys.SCHEDULER_TICKS)
    return {
        "fenced_enqueues": len(log),
        "log_full": len(log) >= keys.FENCED_ENQUEUES_KEEP,
        "leases": [
            {
                "token": span.token,
                "identity": span.identity,
                "enqueues": span.enqueues,
                "firstMs": span.first_ms,
                "lastMs": span.last_ms,
            }
            for span in spans
        ],
        "overlaps": overlaps(spans),
        "ticks": {ticks[i].decode(): int(ticks[i + 1]) for i in range(0, len(ticks), 2)},
    }


async def redis_time_ms(queue: FastRedis) -> int:
    """Redis's clock, which the enqueue log is written in."""
    seconds, micros = await queue.execute("TIME")
    return int(seconds) * 1000 + int(micros) // 1000

"""The cost of one strategy scheduler tick with many tracked users and some active ones.

    .venv/bin/python -m bench.bench_tick                       # 1,000,000 tracked; 10k, 100k active
    .venv/bin/python -m bench.bench_tick --tracked 200000 --active 1000 20000

The indexes are loaded directly (one pipelined ZADD/HSET per shard), as a day of traffic
would have left them: every tracked user has an entry in the expiry index of hot (20%) or
warm (80%) and a predicted next open spread over the coming week (with a profile for those
due soon); the active users are in the activity index, half of them with an entry that
expires before the tick's horizon or none at all. Then `Scheduler.tick(now)` runs as the
leader runs it (activity and predictive on, no fence), twice: the first tick enqueues what
is uncovered, the second (one second later) finds it claimed. For each tick: Redis CPU
(server process, when local, else INFO cpu), commands (INFO commandstats, script-internal
calls included), the scheduler's own CPU (this process), round trips (socket writes of the
four connections) and wall time. Nothing else runs against the bench DBs meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import redis as redis_py

from bench.common import (
    BENCH_DBS,
    flush_bench_dbs,
    local_redis_pid,
    machine,
    print_table,
    redis_target,
    save_result,
)
from bench.procfs import cpu_seconds
from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from engine.strategies.scheduler import Scheduler

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY
# A weekday habit seen five times with a 20-minute jitter: its window (profile.lua, coverage
# 3) opens about 3 * sqrt(400 * 1.2) = 66 minutes before its mean.
HABIT_VAR = 400.0
WINDOW_BEFORE = 66 * MINUTE
CHUNK = 2_000  # members per loader command


def user_ids(count: int) -> list[str]:
    """Deterministic UUID-shaped ids (fast to make; spread over shards by crc32)."""
    return [f"{i:08x}-5eed-4000-8000-{i * 2654435761 % 16**12:012x}" for i in range(count)]


def _by_shard(users: list[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for user in users:
        groups.setdefault(keys.shard_of(user), []).append(user)
    return groups


def _zadds(key_of: Any, scored: dict[int, list[tuple[float, str]]]) -> list[tuple[Any, ...]]:
    commands: list[tuple[Any, ...]] = []
    for shard, pairs in scored.items():
        for i in range(0, len(pairs), CHUNK):
            flat: list[Any] = []
            for score, member in pairs[i : i + CHUNK]:
                flat += (score, member)
            commands.append(("ZADD", key_of(shard), *flat))
    return commands


async def load(
    clients: dict[str, FastRedis], tracked: list[str], active: int, now: int, settings: Settings
) -> dict[str, Any]:
    """Fill the indexes; returns what was loaded."""
    rng = random.Random(7)
    started = time.perf_counter()
    horizon = now + settings.activity_check_interval_ms + settings.activity_refresh_lead_ms
    hot: dict[int, list[tuple[float, str]]] = {}
    warm: dict[int, list[tuple[float, str]]] = {}
    predicted: dict[int, list[tuple[float, str]]] = {}
    profiles: dict[int, dict[str, str]] = {}
    for i, user in enumerate(tracked):
        shard = keys.shard_of(user)
        uncovered = i < active and i % 2 == 0
        expiry = now - 1 if uncovered else now + rng.randint(2 * MINUTE, 15 * MINUTE)
        (hot if i % 5 == 0 else warm).setdefault(shard, []).append((expiry, user))
        opens_at = now + rng.randint(0, WEEK)
        start = opens_at - WINDOW_BEFORE
        predicted.setdefault(shard, []).append((start, user))
        if start <= horizon + HOUR:  # a profile that predicts that open (profile.lua's format)
            day = opens_at // DAY
            kind = 1 if (day + 3) % 7 >= 5 else 0  # 1970-01-01 was a Thursday
            mean = (opens_at % DAY) / MINUTE
            habit = f"{kind},5.0000,{now // MINUTE},{mean:.1f},{HABIT_VAR:.1f}"
            profiles.setdefault(shard, {})[user] = habit
    last_active: dict[int, list[tuple[float, str]]] = {}
    frequency: dict[int, dict[str, int]] = {}
    for user in tracked[:active]:
        shard = keys.shard_of(user)
        last_active.setdefault(shard, []).append(
            (now - rng.randint(0, settings.activity_window_ms - 1_000), user)
        )
        frequency.setdefault(shard, {})[user] = rng.randint(1, 20)

    async def send(client: FastRedis, commands: list[tuple[Any, ...]]) -> None:
        for i in range(0, len(commands), 256):
            for reply in await client.pipeline(commands[i : i + 256]):
                if isinstance(reply, Exception):
                    raise reply

    def hsets(key_of: Any, fields: dict[int, dict[str, Any]]) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for shard, mapping in fields.items():
            flat: list[Any] = []
            for name, value in mapping.items():
                flat += (name, value)
            out.append(("HSET", key_of(shard), *flat))
        return out

    await asyncio.gather(
        send(clients["hot"], _zadds(lambda s: keys.expiry_index("hot", s), hot)),
        send(clients["warm"], _zadds(lambda s: keys.expiry_index("warm", s), warm)),
        send(
            clients["metrics"],
            _zadds(keys.predict_index, predicted)
            + hsets(keys.predict_profile, profiles)
            + _zadds(keys.activity_index, last_active)
            + hsets(keys.activity_frequency, frequency),
        ),
    )
    return {
        "tracked": len(tracked),
        "active": active,
        "profiles": sum(len(p) for p in profiles.values()),
        "loadSeconds": round(time.perf_counter() - started, 2),
    }


def redis_stats(url: str) -> tuple[float, int]:
    """(server CPU seconds from INFO cpu, commands from INFO commandstats)."""
    client = redis_py.Redis.from_url(url)
    try:
        cpu = client.info("cpu")
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = sum(int(v["calls"]) for v in stats.values() if isinstance(v, dict))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls


async def measure_tick(
    scheduler: Scheduler, clients: dict[str, FastRedis], url: str, pid: int | None, now: int
) -> dict[str, Any]:
    distinct = list({id(c): c for c in clients.values()}.values())
    server_before = cpu_seconds(pid) if pid else None
    info_cpu_before, calls_before = redis_stats(url)
    writes_before = sum(c.writes for c in distinct)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    report = await scheduler.tick(now)
    wall = time.perf_counter() - wall_before
    cpu = time.process_time() - cpu_before
    writes = sum(c.writes for c in distinct) - writes_before
    info_cpu_after, calls_after = redis_stats(url)
    server = cpu_seconds(pid) - server_before if pid and server_before is not None else None
    return {
        "wallMs": round(wall * 1000, 1),
        "schedulerCpuMs": round(cpu * 1000, 1),
        "redisCpuMs": round(
            (server if server is not None else info_cpu_after - info_cpu_before) * 1000, 1
        ),
        "redisCommands": calls_after - calls_before - 2,  # minus the two INFO calls
        "roundTrips": writes,
        "candidates": report.candidates,
        "enqueued": report.selected,
        "batches": report.batches,
    }


async def scenario(url: str, pid: int | None, tracked: int, active: int) -> dict[str, Any]:
    flush_bench_dbs(url)
    settings = Settings().with_overrides(
        redis_url=url,
        db_hot=BENCH_DBS["REDIS_DB_HOT"],
        db_warm=BENCH_DBS["REDIS_DB_WARM"],
        db_queue=BENCH_DBS["REDIS_DB_QUEUE"],
        db_metrics=BENCH_DBS["REDIS_DB_METRICS"],
        enable_activity_based=True,
        enable_predictive=True,
    )
    clients = {
        "hot": FastRedis(url, settings.db_hot),
        "warm": FastRedis(url, settings.db_warm),
        "queue": FastRedis(url, settings.db_queue),
        "metrics": FastRedis(url, settings.db_metrics),
    }
    try:
        now = int(time.time() * 1000)
        loaded = await load(clients, user_ids(tracked), active, now, settings)
        scheduler = Scheduler(settings, clients, JobQueue(clients["queue"]))
        await scheduler.plan(now - HOUR)  # loads the scripts; selects nothing yet due
        first = await measure_tick(scheduler, clients, url, pid, now)
        second = await measure_tick(scheduler, clients, url, pid, now + 1_000)
    finally:
        for client in clients.values():
            await client.close()
    return {**loaded, "first": first, "second": second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--tracked", type=int, default=1_000_000)
    parser.add_argument("--active", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with redis_target(args.redis_url) as url:
        pid = local_redis_pid(url)
        for active in args.active:
            results.append(asyncio.run(scenario(url, pid, args.tracked, active)))
        flush_bench_dbs(url)
    rows = []
    for r in results:
        for name in ("first", "second"):
            t = r[name]
            rows.append(
                [
                    f"{r['tracked']:,}",
                    f"{r['active']:,}",
                    name,
                    f"{sum(t['enqueued'].values()):,}",
                    f"{t['wallMs']:.0f}",
                    f"{t['schedulerCpuMs']:.0f}",
                    f"{t['redisCpuMs']:.0f}",
                    f"{t['redisCommands']:,}",
                    str(t["roundTrips"]),
                ]
            )
    print_table(
        [
            "tracked",
            "active",
            "tick",
            "enqueued",
            "wall ms",
            "scheduler CPU ms",
            "Redis CPU ms",
            "Redis commands",
            "round trips",
        ],
        rows,
    )
    path = save_result("bench_tick", {"machine": machine(), "results": results})
    print(f"\nfull result: {path}")


if __name__ == "__main__":
    main()

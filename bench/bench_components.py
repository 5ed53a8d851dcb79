"""What each step of a prefetch costs in CPU, measured one step at a time on real timelines.

    .venv/bin/python -m bench.bench_components --users 2000 --rounds 3

Against a real `prefetch sandbox` and Redis (DB 5, flushed), in this process on uvloop, with
`--concurrency` coroutines as a worker has jobs in flight, each step over `--users` fresh
users (the sandbox's 100-post timelines, about 53 KB of JSON):

- fetch:  GET the timeline with the bearer token, one pooled aiohttp session (the body read,
          not decoded);
- decode: `wire.timeline_page_decoder.decode` into typed posts;
- encode: `wire.cached_body` (the ready response body);
- gzip:   `engine.store.entry.compress` (ISA-L);
- Redis:  SET with PX through FastRedis (the client's CPU; Redis's own is not a worker's).

Each step's CPU time (this process, `time.process_time`) is divided by the users: the CPU
µs per job of the unit of work, split. The rest of a worker's CPU per job, measured
end to end by bench_prefetch, is the engine's (or the plain loop's) overhead: the queue,
the extra round trips, the metrics. Medians of `--rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvloop

from bench.common import (
    SERVICE_TOKEN,
    Services,
    flush_bench_dbs,
    machine,
    print_table,
    redis_target,
    save_result,
    start_sandbox,
)
from engine import wire
from engine.settings import Settings
from engine.store import keys
from engine.store.entry import compress
from engine.store.fastredis import FastRedis

STEPS = ("fetch", "decode", "encode", "gzip", "redis")
ENTRIES_DB = 5
TTL_MS = 900_000


async def _cpu_of(step: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.process_time()
    result = await step()
    return time.process_time() - started, result


async def _gather_limited(
    items: list[Any], concurrency: int, one: Callable[[Any], Awaitable[Any]]
) -> list[Any]:
    """`one(item)` for every item, `concurrency` at once, results in order."""
    results: list[Any] = [None] * len(items)
    indexes = iter(range(len(items)))

    async def worker() -> None:
        for i in indexes:
            results[i] = await one(items[i])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def one_round(
    redis_url: str, timeline_url: str, users: list[str], concurrency: int
) -> dict[str, float]:
    """CPU µs per job of each step over `users`."""
    prefix = timeline_url + Settings().timeline_path.split("{userId}")[0]
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    connector = aiohttp.TCPConnector(limit=concurrency * 2, limit_per_host=concurrency * 2)
    redis = await FastRedis.connect(redis_url, ENTRIES_DB)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def fetch(user: str) -> bytes:
                async with session.get(f"{prefix}{user}?limit=100", headers=headers) as rsp:
                    body = await rsp.read()
                    if rsp.status != 200:
                        raise RuntimeError(f"sandbox answered {rsp.status} for {user}")
                    return body

            warm = [str(uuid.uuid4()) for _ in range(min(200, len(users)))]
            gc.freeze()  # as a worker does after boot
            await _gather_limited(warm, concurrency, fetch)  # connections open, code warm
            fetch_s, raw = await _cpu_of(lambda: _gather_limited(users, concurrency, fetch))

        # One body at a time, as a job does: its objects die before the next one's.
        clock = time.process_time_ns
        decode_ns = encode_ns = gzip_ns = 0
        stored: list[bytes] = []
        json_bytes = 0
        now = int(time.time() * 1000)
        for body in raw:
            t0 = clock()
            posts = wire.timeline_page_decoder.decode(body).posts
            t1 = clock()
            cached = wire.cached_body(posts, now, "warm", cached=True)
            t2 = clock()
            stored.append(compress(cached))
            t3 = clock()
            decode_ns += t1 - t0
            encode_ns += t2 - t1
            gzip_ns += t3 - t2
            json_bytes += len(cached)
            del posts, cached
        decode_s, encode_s, gzip_s = (ns / 1e9 for ns in (decode_ns, encode_ns, gzip_ns))
        pairs = list(zip(users, stored, strict=True))

        async def store(pair: tuple[str, bytes]) -> bool:
            return await redis.set(keys.timeline("warm", pair[0]), pair[1], px=TTL_MS)

        redis_s, _ = await _cpu_of(lambda: _gather_limited(pairs, concurrency, store))
    finally:
        await redis.close()
    per_job = 1e6 / len(users)
    return {
        "fetch": fetch_s * per_job,
        "decode": decode_s * per_job,
        "encode": encode_s * per_job,
        "gzip": gzip_s * per_job,
        "redis": redis_s * per_job,
        "json_bytes": json_bytes / len(users),
        "gzip_bytes": sum(len(b) for b in stored) / len(stored),
    }


def measure(
    users: int, rounds: int, concurrency: int, redis_url: str | None = None
) -> dict[str, Any]:
    """Medians of `rounds` rounds of every step; each round on fresh users."""
    found: list[dict[str, float]] = []
    with redis_target(redis_url) as url, Services("components") as services:
        flush_bench_dbs(url)
        upstreams = start_sandbox(services, url)
        for n in range(rounds):
            ids = [str(uuid.uuid4()) for _ in range(users)]
            found.append(
                uvloop.run(one_round(url, upstreams["TIMELINE_SERVICE_URL"], ids, concurrency))
            )
            print(
                f"  round {n + 1}/{rounds}: "
                + ", ".join(f"{k} {found[-1][k]:.0f} µs" for k in STEPS)
            )
        flush_bench_dbs(url)
    medians = {key: sorted(r[key] for r in found)[len(found) // 2] for key in found[0]}
    return {
        "users": users,
        "rounds": rounds,
        "concurrency": concurrency,
        "us_per_job": {k: medians[k] for k in STEPS},
        "unit_of_work_us": sum(medians[k] for k in STEPS),
        "json_bytes": medians["json_bytes"],
        "gzip_bytes": medians["gzip_bytes"],
        "all_rounds": found,
    }


def report(found: dict[str, Any]) -> None:
    per = found["us_per_job"]
    rows = [[step, f"{per[step]:.0f}"] for step in STEPS]
    rows.append(["unit of work (sum)", f"{found['unit_of_work_us']:.0f}"])
    print()
    print(
        f"CPU µs per job by step, medians of {found['rounds']} rounds of {found['users']} users "
        f"({found['json_bytes'] / 1000:.1f} KB JSON, {found['gzip_bytes'] / 1000:.1f} KB gzip)"
    )
    print_table(["step", "CPU µs/job"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    found = measure(args.users, args.rounds, args.concurrency, args.redis_url)
    report(found)
    print(f"saved {save_result('components', {'machine': machine(), **found})}")


if __name__ == "__main__":
    main()

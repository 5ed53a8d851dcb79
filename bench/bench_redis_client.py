"""Compare engine.store.fastredis.FastRedis with redis.asyncio on GET of a large value.

Each client runs `--concurrency` coroutines that GET the same `--size`-byte key in a loop for
`--duration` seconds (after a short warm-up), and the script prints throughput and the CPU
time this process spent per GET (Redis's own CPU is not counted). Nothing is asserted.

    .venv/bin/python bench/bench_redis_client.py --loop uvloop --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.store.fastredis import FastRedis

Get = Callable[[str], Awaitable[object]]


@dataclass
class Result:
    name: str
    ops: int
    wall: float
    cpu: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu / self.ops * 1e6


async def _drive(get: Get, key: str, expected: bytes, concurrency: int, seconds: float) -> int:
    """Run `concurrency` GET loops for `seconds`; return how many GETs completed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> int:
        done = 0
        while loop.time() < end:
            await get(key)
            done += 1
        return done

    if await get(key) != expected:
        raise SystemExit(f"{key!r} does not hold the expected value")
    return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))


async def _measure(name: str, get: Get, key: str, value: bytes, args: argparse.Namespace) -> Result:
    await _drive(get, key, value, args.concurrency, args.warmup)
    wall, cpu = time.perf_counter(), time.process_time()
    ops = await _drive(get, key, value, args.concurrency, args.duration)
    return Result(name, ops, time.perf_counter() - wall, time.process_time() - cpu)


async def _bench(args: argparse.Namespace) -> list[Result]:
    key = f"bench:fastredis:{os.getpid()}"
    value = os.urandom(args.size)
    results: list[Result] = []
    fast = await FastRedis.connect(args.url, args.db)
    try:
        await fast.set(key, value, px=600_000)
        if "fastredis" in args.clients:
            results.append(await _measure("fastredis (1 conn)", fast.get, key, value, args))
        if "redis-py" in args.clients:
            pool = redis.asyncio.Redis.from_url(args.url, db=args.db)
            try:
                results.append(await _measure("redis.asyncio (pool)", pool.get, key, value, args))
            finally:
                await pool.aclose()
    finally:
        await fast.delete(key)
        await fast.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--db", type=int, default=15)
    parser.add_argument("--size", type=int, default=45 * 1024, help="value size in bytes")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per client")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--clients", default="fastredis,redis-py", help="comma list: fastredis,redis-py"
    )
    args = parser.parse_args()
    args.clients = set(args.clients.split(","))

    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    results = run(_bench(args))

    hiredis_parser = getattr(redis.utils, "HIREDIS_AVAILABLE", "?")
    print(
        f"GET of {args.size} B, concurrency {args.concurrency}, {args.duration:g} s, "
        f"loop {args.loop}, redis-py {redis.__version__} (hiredis parser: {hiredis_parser})"
    )
    header = f"{'client':<22} {'ops':>9} {'ops/s':>10} {'CPU µs/op':>10} {'CPU %':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<22} {r.ops:>9} {r.ops_per_s:>10.0f} {r.cpu_us_per_op:>10.1f} "
            f"{100 * r.cpu / r.wall:>6.0f}"
        )


if __name__ == "__main__":
    main()

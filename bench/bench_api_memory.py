"""API memory under many distinct tokens and users (docs/contract.md §7: an API process < 100 MB).

Starts `prefetch sandbox` and one `prefetch api`, then sends `--requests` reads of
GET /api/cache/{user}, each with its own user and its own token (`sandbox-user-<uuid>`,
so every one is a CA validation and a read-through), over `--connections` kept-alive
connections. The API's RSS is read from /proc before, after each quarter, and after
`--idle` seconds of quiet: memory that never comes back down shows as a flat last column.

    .venv/bin/python -m bench.bench_api_memory --requests 20000 --connections 256 [--reread]

`--reread` then reads every user once more: hits, which fill the API's local copy of read
entries (API_LOCAL_CACHE_MB) to its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import aiohttp

from bench.common import (
    Services,
    flush_bench_dbs,
    free_port,
    machine,
    print_table,
    redis_target,
    save_result,
    service_env,
    start_sandbox,
    wait_http,
)
from bench.procfs import memory_kb


async def _drive(base: str, users: list[str], connections: int) -> dict[int, int]:
    """A read by each of `users`, each with its own token; status -> how many."""
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for user in users:
        queue.put_nowait(user)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                user = queue.get_nowait()
                headers = {"Authorization": f"Bearer sandbox-user-{user}"}
                async with session.get(f"{base}/api/cache/{user}", headers=headers) as rsp:
                    await rsp.read()
                    statuses[rsp.status] = statuses.get(rsp.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def _new_users(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with redis_target(args.redis_url) as url, Services("api-memory") as services:
        flush_bench_dbs(url)
        urls = start_sandbox(services, url)
        port = free_port()
        env = service_env(
            url,
            PREFETCH_SERVICE_PORT=port,
            PREFETCH_SERVICE_HOST="127.0.0.1",
            PREFETCH_METRICS_DIR=services.logs / "metrics",
            **urls,
        )
        api = services.prefetch("api", env)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health/live", api)
        asyncio.run(_drive(base, _new_users(100), 8))  # imports, pools and caches warmed up
        samples: list[tuple[str, int, dict[int, int]]] = [("warm", memory_kb(api.pid), {})]
        quarter = args.requests // 4
        started = time.perf_counter()
        seen: list[str] = []
        for step in range(1, 5):
            seen += (users := _new_users(quarter))
            statuses = asyncio.run(_drive(base, users, args.connections))
            samples.append((f"after {step * quarter}", memory_kb(api.pid), statuses))
        if args.reread:  # hits: each one copied into the API's local cache (API_LOCAL_CACHE_MB)
            statuses = asyncio.run(_drive(base, seen, args.connections))
            samples.append((f"reread {len(seen)}", memory_kb(api.pid), statuses))
        elapsed = time.perf_counter() - started
        time.sleep(args.idle)
        samples.append((f"idle {args.idle:g}s", memory_kb(api.pid), {}))
        peak = memory_kb(api.pid, "VmHWM")
        services.stop(api)
    return {
        "requests": args.requests,
        "connections": args.connections,
        "seconds": round(elapsed, 1),
        "rss_kb": [(label, kb) for label, kb, _ in samples],
        "statuses": [statuses for _, _, statuses in samples],
        "peak_kb": peak,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument(
        "--reread", action="store_true", help="then read every user again (cache hits)"
    )
    args = parser.parse_args()
    found = run(args)
    rows = [
        [label, f"{kb / 1024:.1f}", str(statuses or "")]
        for (label, kb), statuses in zip(found["rss_kb"], found["statuses"], strict=True)
    ]
    print_table(["moment", "API RSS MB", "statuses"], rows)
    print(f"peak RSS {found['peak_kb'] / 1024:.1f} MB, {found['seconds']} s of load")
    print(f"saved {save_result('api-memory', found)}")


if __name__ == "__main__":
    main()

"""Conditional reads: what a client that re-opens the app with an unchanged timeline saves.

Fills the hot tier (DB 4) with `--users` stamped 100-post entries, starts `prefetch sandbox`
and `prefetch api`, learns each user's ETag, then sends `--requests` GETs of
/api/cache/{userId} from `--concurrency` keep-alive connections (random users), per client
kind and mode:

- `200`: no If-None-Match, the whole timeline comes back;
- `304`: If-None-Match with the entry's current tag, the timeline is not sent.

Client kinds: `gzip` (Accept-Encoding: gzip, the stored bytes as they are) and `plain` (no
Accept-Encoding: the API decompresses for it). Reports bytes on the wire per response
(status line, headers and body, as read off the socket), latency percentiles, req/s and
the API's CPU per request. The client is Python on the same 2 CPUs, so req/s are the
client's as much as the server's: compare modes within one run. Nothing is asserted.

    .venv/bin/python -m bench.bench_conditional --requests 4000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    SERVICE_TOKEN,
    Services,
    code_fingerprint,
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
from bench.procfs import cpu_seconds
from bench.reads_data import fill_hot, make_entries


@dataclass
class Run:
    client: str  # gzip | plain
    mode: str  # 200 | 304
    requests: int = 0
    statuses: str = ""
    wire_bytes_per_response: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_us_per_req: float = 0.0


def etags(base: str, users: list[str], client: str) -> dict[str, str]:
    """Each user's current ETag, as this kind of client is given it."""
    found = {}
    for user in users:
        headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
        if client == "gzip":
            headers["Accept-Encoding"] = "gzip"
        request = urllib.request.Request(f"{base}/api/cache/{user}", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as rsp:
            rsp.read()
            found[user] = rsp.headers["ETag"]
    return found


def request_bytes(user: str, client: str, tag: str | None) -> bytes:
    lines = [
        f"GET /api/cache/{user} HTTP/1.1",
        "Host: bench",
        f"Authorization: Bearer {SERVICE_TOKEN}",
    ]
    if client == "gzip":
        lines.append("Accept-Encoding: gzip")
    if tag is not None:
        lines.append(f"If-None-Match: {tag}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def connection(
    port: int, plan: list[tuple[bytes, int]], latencies: list[float], sizes: list[int]
) -> dict[int, int]:
    """Send the planned requests one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: dict[int, int] = {}
    try:
        for payload, _ in plan:
            started = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            latencies.append(time.perf_counter() - started)
            sizes.append(len(head) + len(body))
            status = int(head.split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
    return statuses


def measure(
    port: int,
    api_pid: int,
    users: list[str],
    tags: dict[str, str],
    client: str,
    mode: str,
    args: argparse.Namespace,
) -> Run:
    rng = random.Random(args.seed)
    plans: list[list[tuple[bytes, int]]] = [[] for _ in range(args.concurrency)]
    for n in range(args.requests):
        user = rng.choice(users)
        tag = tags[user] if mode == "304" else None
        plans[n % args.concurrency].append((request_bytes(user, client, tag), 0))
    latencies: list[float] = []
    sizes: list[int] = []

    async def all_connections() -> list[dict[int, int]]:
        return await asyncio.gather(*(connection(port, plan, latencies, sizes) for plan in plans))

    cpu_before = cpu_seconds(api_pid)
    started = time.perf_counter()
    counts = asyncio.run(all_connections())
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(api_pid) - cpu_before
    merged: dict[int, int] = {}
    for found in counts:
        for status, count in found.items():
            merged[status] = merged.get(status, 0) + count
    ordered = sorted(latencies)
    return Run(
        client=client,
        mode=mode,
        requests=len(latencies),
        statuses=", ".join(f"{s}: {n}" for s, n in sorted(merged.items())),
        wire_bytes_per_response=statistics.fmean(sizes),
        rps=len(latencies) / elapsed,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[int(len(ordered) * 0.99)] * 1000,
        server_cpu_us_per_req=cpu / len(latencies) * 1e6,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    with redis_target(args.redis_url) as url, Services("conditional") as services:
        flush_bench_dbs(url)
        entries = make_entries(args.users)
        users = list(entries)
        fill_hot(url, entries, "gzip")
        upstreams = start_sandbox(services, url)
        port = free_port()
        env = service_env(
            url,
            PREFETCH_SERVICE_HOST="127.0.0.1",
            PREFETCH_SERVICE_PORT=port,
            PREFETCH_METRICS_DIR=services.logs / "metrics",
            SERVICE_CERTIFICATE_TOKEN=SERVICE_TOKEN,
            **upstreams,
        )
        api = services.prefetch("api", env)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health/ready", api)
        print(f"{args.users} users in the hot tier; code {code_fingerprint()}")
        runs: list[Run] = []
        for client in ("gzip", "plain"):
            tags = etags(base, users, client)
            for mode in ("200", "304"):
                done = measure(port, api.pid, users, tags, client, mode, args)
                print(f"  {client} client, {mode}: {done.rps:.0f} req/s ({done.statuses})")
                runs.append(done)
    rows = []
    for run_ in runs:
        full = next(r for r in runs if r.client == run_.client and r.mode == "200")
        rows.append(
            [
                f"{run_.client} client",
                run_.mode,
                f"{run_.wire_bytes_per_response:,.0f}",
                f"{run_.rps:,.0f}",
                f"{run_.p50_ms:.2f}",
                f"{run_.p99_ms:.2f}",
                f"{run_.server_cpu_us_per_req:.0f}",
                f"{run_.wire_bytes_per_response / full.wire_bytes_per_response:.3f}",
            ]
        )
    print_table(
        [
            "client",
            "answer",
            "bytes/response",
            "req/s",
            "p50 ms",
            "p99 ms",
            "API CPU µs/req",
            "bytes vs 200",
        ],
        rows,
    )
    return {"machine": machine(), "args": vars(args), "runs": [asdict(r) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--requests", type=int, default=4000, help="per client kind and mode")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url", default=None, help="default: an embedded Valkey")
    args = parser.parse_args()
    result = run(args)
    print(f"saved {save_result('conditional', result)}")


if __name__ == "__main__":
    main()

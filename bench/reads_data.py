"""What bench_reads serves and checks: the users' entries, stored as a worker stores them, and
one read verified against them; and redis-benchmark, the physical limit of one Redis.

Kept apart from the run's orchestration so that bench_reads.py reads as the sequence of its
sections and rounds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.common import BENCH_DBS, SERVICE_TOKEN
from engine.store import keys
from engine.store.entry import compress, new_tag, stamp
from engine.wire import cached_body
from sandbox import generate_posts

POSTS_PER_USER = 100
ENTRY_TTL_MS = 3_600_000


def make_entries(count: int) -> dict[str, bytes]:
    """Plain response bodies of `count` fresh users (100 posts each, as the worker stores)."""
    now_ms = int(time.time() * 1000)
    return {
        user: cached_body(generate_posts(user, POSTS_PER_USER), now_ms, "hot", cached=True)
        for user in (str(uuid.uuid4()) for _ in range(count))
    }


def fill_hot(url: str, entries: dict[str, bytes], compression: str) -> int:
    """Store every entry in the hot tier the way the worker does (compressed as asked,
    stamped with an entity tag and its expiry); returns the mean size."""
    client = redis.Redis.from_url(url, db=BENCH_DBS["REDIS_DB_HOT"])
    total = 0
    expires_at = int(time.time() * 1000) + ENTRY_TTL_MS
    try:
        client.flushdb()
        pipe = client.pipeline(transaction=False)
        for n, (user, body) in enumerate(entries.items(), 1):
            encoded = compress(body) if compression == "gzip" else body
            stored = stamp(encoded, new_tag(), expires_at)
            total += len(stored)
            pipe.set(keys.timeline("hot", user), stored, px=ENTRY_TTL_MS)
            if n % 200 == 0:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()
    return total // max(1, len(entries))


def check_response(url: str, encoding: str, user: str, expected: bytes) -> tuple[str, int]:
    """One GET: 200, a JSON body equal to what was stored, meta.cached true.

    Returns (served encoding, bytes on the wire)."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    if encoding == "gzip":
        headers["Accept-Encoding"] = "gzip"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as rsp:
        status, raw = rsp.status, rsp.read()
        served = "gzip" if rsp.headers.get("Content-Encoding") == "gzip" else "plain"
    if status != 200:
        raise SystemExit(f"GET {url}: status {status}")
    body = gzip.decompress(raw) if served == "gzip" else raw
    if encoding == "plain" and served == "gzip":
        raise SystemExit(f"GET {url}: gzip sent to a client that did not accept it")
    payload = json.loads(body)
    if payload.get("meta", {}).get("cached") is not True or not payload.get("success"):
        raise SystemExit(f"GET {url}: unexpected body head {body[:200]!r}")
    if payload["data"]["postsCount"] != POSTS_PER_USER or body != expected:
        raise SystemExit(f"GET {url}: body differs from the stored entry")
    return served, len(raw)


# --- redis-benchmark ---------------------------------------------------------------------------


def redis_benchmark(url: str, size: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """GET of a `size`-byte value with redis-benchmark, `-c connections`; None if unavailable."""
    tool = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if tool is None:
        return None
    db = BENCH_DBS["REDIS_DB_HOT"]
    client = redis.Redis.from_url(url, db=db)
    try:  # without -r redis-benchmark GETs this very key; it must hold a value of the size
        client.set("key:__rand_int__", os.urandom(size), px=600_000)
    finally:
        client.close()
    parts = urlsplit(url)
    argv = [tool]
    if parts.scheme == "unix":
        argv += ["-s", parts.path]
    else:
        argv += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        if parts.scheme == "rediss":
            argv.append("--tls")
    if parts.password:
        argv += ["-a", parts.password, "--no-auth-warning"]
    argv += ["--dbnum", str(db), "-t", "get", "-d", str(size)]
    argv += ["-c", str(args.connections), "-n", str(args.redis_requests), "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    out = done.stdout.replace("\r", "\n")
    matches = re.findall(
        r"GET: ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", out, re.IGNORECASE
    )
    if done.returncode != 0 or not matches:
        print(f"  ! redis-benchmark failed: {done.stderr.strip() or out.strip()}")
        return None
    rps, p50 = matches[-1]
    shown = [a if a != parts.password else "***" for a in argv]
    return {
        "size": size,
        "rps": float(rps),
        "p50_ms": float(p50) if p50 else None,
        "command": " ".join(shown),
    }

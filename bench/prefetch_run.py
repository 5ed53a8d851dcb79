"""What one measured phase of bench_prefetch records, and the check of the entries it wrote.

The engine run (bench/prefetch_engine.py) and the plain-loop baseline
(bench/prefetch_baseline.py) fill the same `Run`, so that the report and the matrix
(bench/bench_prefetch.py) compare like with like; both check a sample of their entries with
`verify_entries`, so a fast run that stored the wrong thing does not pass unnoticed. The
BullMQ peer (bench/bench_peers.py) records its rounds in a `Run` too, and `summary` makes
one cell of medians of any of them.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import uvloop

from bench.common import BENCH_DBS
from engine import wire
from engine.store import keys
from engine.store.entry import decompress
from engine.store.fastredis import FastRedis

WARMUP_JOBS = 200


@dataclass
class Run:
    """One measured phase (the engine or the baseline)."""

    name: str
    jobs: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    schedule_seconds: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # by role
    peak_rss_mb: list[float] = field(default_factory=list)  # per worker process
    rss_mb: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    other_cpu_pct: float = 0.0  # CPU used meanwhile by processes outside this bench

    def account_others(self, busy_s: float) -> None:
        """Whatever else ran on the machine during the run skews every number: note it."""
        if self.seconds:
            ours = sum(self.cpu_s.values())
            self.other_cpu_pct = max(0.0, 100 * (busy_s - ours) / self.seconds)

    @property
    def jobs_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def cpu_us_per_job(self, role: str) -> float | None:
        used = self.cpu_s.get(role)
        return None if used is None or not self.done else used / self.done * 1e6


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def paired_ratios(numerators: list[float | None], denominators: list[float | None]) -> list[float]:
    """Each pair's ratio, in order, leaving out a pair with a missing or zero value."""
    return [a / b for a, b in zip(numerators, denominators, strict=True) if a and b]


def summary(runs: list[Run]) -> dict[str, Any]:
    """Medians of the rounds of one cell, and the rounds themselves."""
    return {
        "jobs_per_s": median([r.jobs_per_s for r in runs]),
        "worker_cpu_us_per_job": median([r.cpu_us_per_job("workers") or 0.0 for r in runs]),
        "peak_rss_mb": median([max(r.peak_rss_mb or [0.0]) for r in runs]),
        "other_cpu_pct": median([r.other_cpu_pct for r in runs]),
        "rounds": [asdict(r) | {"jobs_per_s": r.jobs_per_s} for r in runs],
    }


def fresh_users(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def verify_entries(url: str, users: list[str], compression: str) -> list[str]:
    """A sample of the run's entries: in the warm tier, 100 posts, of the right user."""

    async def check() -> list[str]:
        problems: list[str] = []
        warm = await FastRedis.connect(url, BENCH_DBS["REDIS_DB_WARM"])
        try:
            for user in users[:: max(1, len(users) // 25)]:
                stored = await warm.get(keys.timeline("warm", user))
                if stored is None:
                    problems.append(f"{user}: no warm entry")
                    continue
                is_gzip = stored[:2] == b"\x1f\x8b"
                if is_gzip != (compression == "gzip"):
                    problems.append(f"{user}: stored gzip={is_gzip}, expected {compression}")
                body = decompress(stored)
                entry = msgspec.json.decode(body, type=wire.CachedTimeline)
                if entry.data.postsCount != 100 or entry.data.posts[0].userId != user:
                    problems.append(f"{user}: wrong entry")
        finally:
            await warm.close()
        return problems

    return uvloop.run(check())

"""What a replay measures, the same way in the simulation and in the real-time run.

A `Tally` is fed one call per read (and per fetch, job and queue sample) and summarised into
the figures of the report: hit rates of app opens and of all reads, app-open latency
percentiles, upstream fetches and prefetch jobs per app open, the peak queue depth, which
origin's prefetch served the app opens, predictive precision and recall, hit rates by kind of
open (what limits the hit rate) and per hour of the measured period.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.replay.population import HOUR, MINUTE, Population, Read

# Kinds of app open, to tell what limits the hit rate.
KINDS = (
    "habit, jitter under 10 min",
    "habit, jitter 10-30 min",
    "habit, jitter over 30 min",
    "off-habit",
    "joined this week",
)
# Origins of the entry that served an app open: a prefetch's (engine.broker.jobs.ORIGINS,
# from its unread mark), "read" (an entry some earlier read had already used, or a
# read-through's), or "miss".
SERVED = ("predictive", "activity", "event", "schedule", "immediate", "read", "miss")


def kind_of(population: Population, read: Read) -> str:
    """The kind of an app open (see KINDS)."""
    session = population.sessions[read.session]
    if population.users[read.user].joined_at is not None:
        return KINDS[4]
    if not session.habitual:
        return KINDS[3]
    jitter = abs(session.jitter_ms)
    if jitter < 10 * MINUTE:
        return KINDS[0]
    return KINDS[1] if jitter <= 30 * MINUTE else KINDS[2]


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Tally:
    """Counters of one replay of one strategy mix over [start_ms, end_ms)."""

    population: Population
    start_ms: int
    end_ms: int
    hour_ms: int = HOUR  # an hour of the replayed period (shorter when time is compressed)
    reads: int = 0
    read_hits: int = 0
    opens: int = 0
    open_hits: int = 0
    stale_hits: int = 0
    fetches: int = 0
    jobs_by_origin: Counter[str] = field(default_factory=Counter)
    peak_queue: int = 0
    open_latency_ms: list[float] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    kind_hits: Counter[str] = field(default_factory=Counter)
    hourly_opens: list[int] = field(default_factory=list)
    hourly_hits: list[int] = field(default_factory=list)
    usefulness: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hours = max(1, -(-(self.end_ms - self.start_ms) // self.hour_ms))
        self.hourly_opens = [0] * hours
        self.hourly_hits = [0] * hours

    def read(
        self, read: Read, hit: bool, latency_ms: float, served_by: str, stale: bool = False
    ) -> None:
        """One read: a hit or not, its latency, the origin that served it (app opens)."""
        if not self.start_ms <= read.at < self.end_ms:
            return
        self.reads += 1
        self.read_hits += hit
        self.stale_hits += hit and stale
        if not read.first:
            return
        self.opens += 1
        self.open_hits += hit
        self.open_latency_ms.append(latency_ms)
        self.served[served_by if hit else "miss"] += 1
        kind = kind_of(self.population, read)
        self.kinds[kind] += 1
        self.kind_hits[kind] += hit
        hour = (read.at - self.start_ms) // self.hour_ms
        self.hourly_opens[hour] += 1
        self.hourly_hits[hour] += hit

    def queue_depth(self, waiting: int) -> None:
        """A sample (or the exact value) of the messages waiting on the queue."""
        self.peak_queue = max(self.peak_queue, waiting)

    def summary(self) -> dict[str, Any]:
        """The figures of the report (rates as fractions, latencies in ms)."""
        opens = self.opens or 1
        jobs = sum(n for origin, n in self.jobs_by_origin.items() if origin != "read-through")
        predictive = self.usefulness.get("byOrigin", {}).get("predictive", {})
        return {
            "opens": self.opens,
            "reads": self.reads,
            "openHitRate": self.open_hits / opens,
            "readHitRate": self.read_hits / (self.reads or 1),
            "staleHitShare": self.stale_hits / (self.read_hits or 1),
            "openLatencyP50Ms": percentile(self.open_latency_ms, 0.50),
            "openLatencyP99Ms": percentile(self.open_latency_ms, 0.99),
            "fetchesPerOpen": self.fetches / opens,
            "jobsPerOpen": jobs / opens,
            "fetches": self.fetches,
            "jobsByOrigin": dict(self.jobs_by_origin),
            "peakQueue": self.peak_queue,
            "servedBy": {origin: self.served.get(origin, 0) for origin in SERVED},
            "predictivePrecision": predictive.get("precision"),
            "predictiveRecall": self.served.get("predictive", 0) / opens,
            "usefulness": self.usefulness,
            "byKind": {
                kind: {
                    "opens": self.kinds.get(kind, 0),
                    "hitRate": self.kind_hits.get(kind, 0) / (self.kinds.get(kind, 0) or 1),
                }
                for kind in KINDS
            },
            "hourlyOpenHitRate": [
                (h / o if o else None)
                for h, o in zip(self.hourly_hits, self.hourly_opens, strict=True)
            ],
            "hourlyOpens": list(self.hourly_opens),
        }

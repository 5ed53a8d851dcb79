"""Prometheus metrics (the seed's names), shared by every process of a pod.

When PREFETCH_METRICS_DIR is set (the CLI exports it as PROMETHEUS_MULTIPROC_DIR before
anything imports this module),
each process writes its values to files there and GET /metrics aggregates them; otherwise
the process's own registry is served (tests, single-process use).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CACHE_HITS = Counter("prefetch_cache_hits", "Cached timeline reads served, by tier", ["tier"])
CACHE_MISSES = Counter("prefetch_cache_misses", "Timeline reads that found no cached entry")
QUEUE_JOBS = Counter("prefetch_queue_jobs", "Prefetch operations finished, by status", ["status"])
QUEUE_DURATION = Histogram(
    "prefetch_queue_duration_seconds", "Duration of prefetch operations", buckets=_DURATION_BUCKETS
)
FETCH_DURATION = Histogram(
    "prefetch_timeline_fetch_duration_seconds",
    "Duration of timeline service calls",
    buckets=_DURATION_BUCKETS,
)
TOKEN_REFRESH = Counter(
    "prefetch_token_refresh", "Service tokens dropped and renewed after a 401/403 from the timeline"
)

OPERATIONS = Counter(
    "prefetch_operations",
    "Prefetch operations finished, by what started them (origin) and status",
    ["origin", "status"],
)
PREFETCHED_READ = Counter(
    "prefetch_prefetched_entries_read",
    "Prefetched entries that a read served before they expired, by origin",
    ["origin"],
)
PREFETCHED_WASTED = Counter(
    "prefetch_prefetched_entries_wasted",
    "Prefetched entries that expired or were replaced before any read, by origin",
    ["origin"],
)
SCHEDULER_TICKS = Counter(
    "prefetch_scheduler_ticks", "Strategy scheduler ticks run by this pod's leader"
)
SCHEDULER_SELECTED = Counter(
    "prefetch_scheduler_selected",
    "Users the strategy scheduler enqueued, by strategy (origin) and priority",
    ["origin", "priority"],
)
SCHEDULER_TICK_DURATION = Histogram(
    "prefetch_scheduler_tick_duration_seconds",
    "Duration of strategy scheduler ticks",
    buckets=_DURATION_BUCKETS,
)

HOT_HIT = CACHE_HITS.labels(tier="hot")
WARM_HIT = CACHE_HITS.labels(tier="warm")
JOB_COMPLETED = QUEUE_JOBS.labels(status="completed")
JOB_FAILED = QUEUE_JOBS.labels(status="failed")


def render(multiprocess_dir: str) -> tuple[bytes, str]:
    """(body, content type) of GET /metrics: every process of the pod when multiprocess."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

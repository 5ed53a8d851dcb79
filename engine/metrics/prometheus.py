"""Prometheus metrics, shared by every process of a pod: the seed's names, the strategies',
and what an operator needs (HTTP requests, upstream errors by kind, CA calls and the auth
cache, jobs in flight). README, "Observability", lists them; the queue's depth is read at
scrape time (engine/metrics/scrape.py), and the per-request ones are tallied by the API
before they land here (api/http_metrics.py).

When PREFETCH_METRICS_DIR is set (the CLI exports it as PROMETHEUS_MULTIPROC_DIR before
anything imports this module), each process writes its values to files there and GET
/metrics aggregates them; otherwise the process's own registry is served (tests,
single-process use).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from engine.broker.jobs import ORIGINS

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A cached read takes 1-5 ms end to end, a read-through tens to hundreds: fine steps below
# 10 ms, so that p99 against a 5 ms budget is read between two nearby bounds.
HTTP_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
UPSTREAM_ERROR_KINDS: Final = ("timeout", "connect", "5xx", "4xx", "404", "malformed")

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

HTTP_REQUESTS = Counter(
    "prefetch_http_requests",
    "API requests answered, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "prefetch_http_request_duration_seconds",
    "API request duration, from the app taking it to its last byte written, by route template, "
    "and for timeline reads whether the cache had it (cache: hit, miss; none elsewhere)",
    ["route", "cache"],
    buckets=HTTP_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "prefetch_upstream_errors",
    "Failed calls to an upstream (timeline, ca), by kind: timeout, connect, 5xx, 4xx, 404, "
    "malformed (a body that does not decode)",
    ["upstream", "kind"],
)
CA_CALLS = Counter(
    "prefetch_ca_calls",
    "Token validations asked of the CA, by outcome: valid, invalid (a verdict), error",
    ["outcome"],
)
AUTH_CACHE = Counter(
    "prefetch_auth_cache",
    "Token checks answered from the per-process validation cache (hit) or not (miss)",
    ["result"],
)
JOBS_IN_FLIGHT = Gauge(
    "prefetch_jobs_in_flight",
    "Jobs running in the worker processes now",
    multiprocess_mode="livesum",
)

HOT_HIT = CACHE_HITS.labels(tier="hot")
WARM_HIT = CACHE_HITS.labels(tier="warm")
JOB_COMPLETED = QUEUE_JOBS.labels(status="completed")
_OPERATIONS_BY: dict[tuple[str, bool], object] = {}


def operations(origin: str, ok: bool) -> object:
    """OPERATIONS' child for `origin` and the outcome, looked up once per pair."""
    child = _OPERATIONS_BY.get((origin, ok))
    if child is None:
        status = "completed" if ok else "failed"
        child = _OPERATIONS_BY[origin, ok] = OPERATIONS.labels(origin=origin, status=status)
    return child


JOB_FAILED = QUEUE_JOBS.labels(status="failed")


AUTH_HIT = AUTH_CACHE.labels(result="hit")
AUTH_MISS = AUTH_CACHE.labels(result="miss")


def _initialise() -> None:
    """Create every known label set at zero, so that each series exists from the start (a
    rate over a series that appears with its first event misses that event, and dashboards
    and alerts would look for names that are not there yet)."""
    for upstream in ("timeline", "ca"):
        for kind in UPSTREAM_ERROR_KINDS:
            UPSTREAM_ERRORS.labels(upstream=upstream, kind=kind)
    for outcome in ("valid", "invalid", "error"):
        CA_CALLS.labels(outcome=outcome)
    # What the tick's strategies select: activity sends high or medium, predictive medium.
    selected = (("activity", "high"), ("activity", "medium"), ("predictive", "medium"))
    for origin, priority in selected:
        SCHEDULER_SELECTED.labels(origin=origin, priority=priority)
    for origin in ORIGINS:
        for status in ("completed", "failed"):
            OPERATIONS.labels(origin=origin, status=status)
        PREFETCHED_READ.labels(origin=origin)
        PREFETCHED_WASTED.labels(origin=origin)


_initialise()


def status_kind(status: int) -> str:
    """The error kind of an upstream's HTTP status: 404, 4xx or 5xx."""
    if status == 404:
        return "404"
    return "5xx" if status >= 500 else "4xx"


def upstream_error(upstream: str, kind: str) -> None:
    """Count one failed call to `upstream` (timeline, ca) of `kind` (UPSTREAM_ERROR_KINDS)."""
    UPSTREAM_ERRORS.labels(upstream=upstream, kind=kind).inc()


def ca_call_failed(kind: str) -> None:
    """Count one token validation the CA did not answer usably."""
    CA_CALLS.labels(outcome="error").inc()
    upstream_error("ca", kind)


def render(multiprocess_dir: str) -> tuple[bytes, str]:
    """(body, content type) of GET /metrics: every process of the pod when multiprocess."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

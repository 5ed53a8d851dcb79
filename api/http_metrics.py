"""The per-request metrics of an API process, tallied in memory and published once a second.

Every request is counted (`prefetch_http_requests_total`, the duration histogram), every
token check is a hit or a miss of the validation cache (`prefetch_auth_cache_total`), and
every timeline read a hit by tier or a miss (`prefetch_cache_hits_total`,
`prefetch_cache_misses_total`). In a
pod, each Prometheus increment is a locked write into the process's mmapped file: about
2 µs for a counter and 5 µs for a histogram observation on the test machine, several per
request, against a cached read that costs ~120-150 µs in all. So the request path adds to
plain dicts (a fraction of a microsecond), and `flush` adds the tallies to the Prometheus
values once a second (the app's metrics task) and before each scrape of this process:
another process's last second may be missing from a scrape, never lost.

The histogram's buckets are filled through prometheus_client's child internals, by
engine.metrics.tally.add_observations (the one place that touches them; see there). `flush`
also flushes that module's per-job tallies (prefetch operations this process ran: immediate
prefetches, read-throughs), so the API's metrics task and its scrapes publish both.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Final

from engine.metrics import prometheus, tally

FLUSH_INTERVAL_S: Final = 1.0

_BOUNDS: Final = tuple(float(b) for b in prometheus.HTTP_BUCKETS)

_requests: Counter[tuple[str, str, int]] = Counter()
# (route, cache) -> [count per bucket (the last one +Inf), sum of seconds]
_durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
_auth = [0, 0]  # hits, misses
_reads = [0, 0, 0]  # hot hits, warm hits, misses


def observe(route: str, method: str, status: int, seconds: float, cache: str = "none") -> None:
    """One answered request (`cache`: hit or miss for a timeline read, else none)."""
    _requests[route, method, status] += 1
    found = _durations.get((route, cache))
    if found is None:
        found = _durations[route, cache] = ([0] * (len(_BOUNDS) + 1), [0.0])
    found[0][bisect_left(_BOUNDS, seconds)] += 1  # le: a value on a bound is in its bucket
    found[1][0] += seconds


def auth_hit() -> None:
    """A token check answered from the validation cache."""
    _auth[0] += 1


def auth_miss() -> None:
    """A token check that had to ask the CA (or wait for another request's call)."""
    _auth[1] += 1


def cache_hit(tier: str) -> None:
    """A timeline read served from `tier` (hot or warm)."""
    _reads[0 if tier == "hot" else 1] += 1


def cache_miss() -> None:
    """A timeline read that found no cached entry."""
    _reads[2] += 1


def flush() -> None:
    """Add what was tallied since the last flush to the Prometheus values."""
    if _requests:
        tallied = dict(_requests)
        _requests.clear()
        for (route, method, status), count in tallied.items():
            prometheus.HTTP_REQUESTS.labels(route, method, str(status)).inc(count)
    if _durations:
        durations = list(_durations.items())
        _durations.clear()
        for (route, cache), (buckets, total) in durations:
            child = prometheus.HTTP_DURATION.labels(route, cache)
            tally.add_observations(child, _BOUNDS, buckets, total[0])
    hits, misses = _auth
    _auth[0] = _auth[1] = 0
    if hits:
        prometheus.AUTH_HIT.inc(hits)
    if misses:
        prometheus.AUTH_MISS.inc(misses)
    hot, warm, missed = _reads
    _reads[0] = _reads[1] = _reads[2] = 0
    if hot:
        prometheus.HOT_HIT.inc(hot)
    if warm:
        prometheus.WARM_HIT.inc(warm)
    if missed:
        prometheus.CACHE_MISSES.inc(missed)
    tally.flush()

"""Per-job metric updates, tallied in plain dicts and added to Prometheus once a second.

In a pod every Prometheus update is a locked write into the process's mmapped file: a job's
five (the fetch's and the operation's durations, the operation and queue counters) cost
about 10 µs together on the test machine (tuning.md, "The job engine"), the plain asyncio
loop that the engine is measured against does none, and the worker spends ~700 µs per job
in all. So the job path adds to dicts here (a fraction of a microsecond per update), and
`flush` hands the tallies to prometheus_client: once a second from each process's metrics
task (the worker's, the API's), and before the API answers a scrape. Another process's last
second may be missing from a scrape, never lost; a process that dies loses at most its last
second, as one that dies between two increments of its own would lose the next.

Histogram observations are added through prometheus_client's child internals
(`_upper_bounds`, `_buckets`, `_sum`): this module is the one place that does so (the API's
per-request metrics, api/http_metrics.py, are tallied here too); the library has no bulk
observation. tests/test_observe_metrics.py checks that the exposition counts what was
observed, so an upgrade that changes them fails there.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final

FLUSH_INTERVAL_S: Final = 1.0

# A counter (child) -> what to add to it.
_counts: dict[Any, float] = {}
# A histogram (child) -> (its finite bucket bounds, [count per bucket, the last one +Inf],
# [sum of values]).
_observed: dict[Any, tuple[tuple[float, ...], list[int], list[float]]] = {}


def inc(counter: Any, amount: float = 1.0) -> None:
    """Tally `amount` for a Prometheus counter (or a labelled child of one)."""
    _counts[counter] = _counts.get(counter, 0.0) + amount


def observe(histogram: Any, value: float) -> None:
    """Tally one observation of a Prometheus histogram (or a labelled child of one)."""
    found = _observed.get(histogram)
    if found is None:
        bounds = tuple(histogram._upper_bounds[:-1])
        found = _observed[histogram] = (bounds, [0] * (len(bounds) + 1), [0.0])
    found[1][bisect_left(found[0], value)] += 1  # le: a value on a bound is in its bucket
    found[2][0] += value


def flush() -> None:
    """Add what was tallied since the last flush to the Prometheus values."""
    if _counts:
        counts = list(_counts.items())
        _counts.clear()
        for counter, amount in counts:
            counter.inc(amount)
    if _observed:
        observed = list(_observed.items())
        _observed.clear()
        for histogram, (bounds, buckets, total) in observed:
            add_observations(histogram, bounds, buckets, total[0])


def add_observations(
    child: Any, bounds: tuple[float, ...], buckets: list[int], total: float
) -> None:
    """Add per-bucket observation counts to a histogram child (its internals: see above)."""
    if tuple(child._upper_bounds[:-1]) != bounds:
        raise RuntimeError("the histogram's buckets are not the ones tallied against")
    for value, count in zip(child._buckets, buckets, strict=True):
        if count:
            value.inc(count)
    child._sum.inc(total)

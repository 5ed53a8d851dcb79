"""GET /metrics of the API: the pod's files read off the event loop, plus the queue's depth.

Reading the multiprocess directory costs a file read per process and metric kind, and
grows with the pod's processes and label sets: done on the loop, it would stall every
request meanwhile. So the files are read in a thread, and concurrent scrapes share one read
(two Prometheus servers, a curl): at most one such thread per process, whatever the rate.

The queue's depth is not a counter any process keeps: it is read from the queue at scrape
time (one pipelined read of every queue's lengths, `JobQueue.stats`) and served as the gauge
`prefetch_queue_depth{state,priority}`, states waiting, active, delayed and dead. Every API
pod reports the same queue: aggregate it with max(), not sum(). When Redis does not answer
within QUEUE_STATS_TIMEOUT_S the gauge is left out of that scrape (a gap, not a zero) and
`prefetch_queue_depth_up` is 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.metrics.prometheus import render
from engine.throttle import LogThrottle

log = logging.getLogger(__name__)

QUEUE_STATS_TIMEOUT_S: Final = 1.0
QUEUE_STATES: Final = ("waiting", "active", "delayed", "dead")

QueueStats = Callable[[], Awaitable[dict[str, Any]]]


class _QueueDepth(Collector):
    """The gauge families of one queue stats answer (None: Redis did not answer)."""

    def __init__(self, stats: dict[str, Any] | None) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "prefetch_queue_depth_up", "Whether this scrape could read the queue's depth"
        )
        up.add_metric([], 0 if self._stats is None else 1)
        yield up
        if self._stats is None:
            return
        depth = GaugeMetricFamily(
            "prefetch_queue_depth",
            "Jobs in the queue now, by state (waiting, active, delayed, dead) and priority; "
            "read from Redis at scrape time (every API pod reports the same queue)",
            labels=["state", "priority"],
        )
        for priority, counts in self._stats["byPriority"].items():
            for state in QUEUE_STATES:
                depth.add_metric([state, priority], counts[state])
        yield depth


def queue_depth_text(stats: dict[str, Any] | None) -> bytes:
    """The exposition text of the queue's depth gauges."""
    registry = CollectorRegistry()
    registry.register(_QueueDepth(stats))
    return generate_latest(registry)


class Scraper:
    """Serves one process's /metrics: one scrape at a time, shared by concurrent callers."""

    def __init__(
        self,
        multiprocess_dir: str,
        queue_stats: QueueStats | None,
        before: Callable[[], None] | None = None,
    ) -> None:
        self._dir = multiprocess_dir
        self._queue_stats = queue_stats
        self._before = before  # on the loop, first: publish what this process tallied
        self._flight: asyncio.Future[tuple[bytes, str]] | None = None
        self._throttle = LogThrottle(log)

    async def scrape(self) -> tuple[bytes, str]:
        """(body, content type): this scrape's, or the one in progress when it was asked."""
        flight = self._flight
        if flight is None:
            flight = asyncio.ensure_future(self._scrape())
            self._flight = flight
            flight.add_done_callback(self._landed)
        return await asyncio.shield(flight)

    def _landed(self, flight: asyncio.Future[tuple[bytes, str]]) -> None:
        self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved: a scrape nobody waits for any more must not warn

    async def _scrape(self) -> tuple[bytes, str]:
        if self._before is not None:
            self._before()
        stats: dict[str, Any] | None = None
        if self._queue_stats is not None:
            try:
                stats = await asyncio.wait_for(self._queue_stats(), QUEUE_STATS_TIMEOUT_S)
            except Exception as exc:  # Redis down or refusing: the rest of /metrics still serves
                self._throttle.warning("queue-stats", "queue depth not read for /metrics: %r", exc)
        return await asyncio.to_thread(self._render, stats)

    def _render(self, stats: dict[str, Any] | None) -> tuple[bytes, str]:
        body, content_type = render(self._dir)
        if self._queue_stats is not None:
            body += queue_depth_text(stats)
        return body, content_type

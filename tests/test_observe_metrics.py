"""Metrics an operator needs: HTTP, upstream errors, CA and auth cache, queue depth, and the
pod's multiprocess directory. Values are read from GET /metrics, as Prometheus reads them.

In these in-process tests the API serves the test process's own registry (no multiprocess
directory), which every test shares: each test compares values before and after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import metrics_dir, scrape
from engine.metrics.daily import StatsRecorder
from engine.settings import Settings
from engine.store.fastredis import FastRedis
from tests.conftest import ApiClient, closed_port, eventually, new_user, serve_api
from tests.engine_support import Engine, holds_for, user, wait_for

pytestmark = pytest.mark.timeout(60)

HIT_ROUTE = "/api/cache/{userId}"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition text, by (name, labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


async def scrape_text(api: ApiClient) -> str:
    reply = await api.call("GET", "/metrics", token=None)
    assert reply.status == 200
    return reply.raw.decode()


async def value(api: ApiClient, name: str, **labels: str) -> float:
    """One sample's value now (0 when the series does not exist yet)."""
    return samples(await scrape_text(api)).get((name, frozenset(labels.items())), 0.0)


async def wait_value(api: ApiClient, name: str, expected: float, **labels: str) -> None:
    """Wait until a sample reaches `expected` (a request is counted once it was written)."""

    async def reached() -> bool:
        return await value(api, name, **labels) >= expected

    await eventually(reached)
    assert await value(api, name, **labels) == expected


# --- HTTP ------------------------------------------------------------------------------------


async def test_requests_are_counted_by_route_template_method_and_status(api: ApiClient) -> None:
    labels = {"route": HIT_ROUTE, "method": "GET", "status": "200"}
    duration = "prefetch_http_request_duration_seconds_count"
    before = await value(api, "prefetch_http_requests_total", **labels)
    hits = await value(api, duration, route=HIT_ROUTE, cache="hit")
    misses = await value(api, duration, route=HIT_ROUTE, cache="miss")
    reader = new_user()
    for _ in range(3):  # a read-through, then two hits: one route, whatever the user
        assert (await api.call("GET", f"/api/cache/{reader}")).status == 200
    assert (await api.call("GET", f"/api/cache/{new_user('0000dead-')}")).status == 404
    await wait_value(api, "prefetch_http_requests_total", before + 3, **labels)
    # A cached read's duration stands apart from read-throughs (its p99 has a budget).
    await wait_value(api, duration, hits + 2, route=HIT_ROUTE, cache="hit")
    await wait_value(api, duration, misses + 2, route=HIT_ROUTE, cache="miss")
    assert await value(api, "prefetch_http_requests_total", **{**labels, "status": "404"}) >= 1
    text = await scrape_text(api)
    assert reader not in text  # paths never become labels
    # The buckets resolve the 1-5 ms of a hit.
    bounds = {
        dict(labels)["le"]
        for (name, labels) in samples(text)
        if name == "prefetch_http_request_duration_seconds_bucket"
    }
    assert {"0.001", "0.002", "0.003", "0.005"} <= bounds
    other = await value(api, duration, route="/metrics", cache="none")
    assert other >= 1


def test_tallied_observations_land_in_the_right_buckets() -> None:
    # api/http_metrics fills the histogram through prometheus_client's internals: the
    # exposition must count exactly what was observed (a value on a bound is in its bucket).
    from prometheus_client import REGISTRY, generate_latest

    from api import http_metrics

    for seconds in (0.0004, 0.0015, 0.003, 20.0):
        http_metrics.observe("/test/buckets", "GET", 200, seconds, "hit")
    http_metrics.auth_hit()
    hits_before = samples(generate_latest(REGISTRY).decode())[
        ("prefetch_auth_cache_total", frozenset({("result", "hit")}))
    ]
    http_metrics.flush()
    found = samples(generate_latest(REGISTRY).decode())

    def bucket(le: str) -> float:
        labels = {("route", "/test/buckets"), ("cache", "hit"), ("le", le)}
        return found[("prefetch_http_request_duration_seconds_bucket", frozenset(labels))]

    assert [bucket(le) for le in ("0.0005", "0.001", "0.0015", "0.003", "10.0", "+Inf")] == [
        1,
        1,
        2,
        3,
        3,
        4,
    ]
    labels = frozenset({("route", "/test/buckets"), ("cache", "hit")})
    assert found[("prefetch_http_request_duration_seconds_count", labels)] == 4
    assert found[("prefetch_http_request_duration_seconds_sum", labels)] == pytest.approx(20.0049)
    requests = {("route", "/test/buckets"), ("method", "GET"), ("status", "200")}
    assert found[("prefetch_http_requests_total", frozenset(requests))] == 4
    auth = found[("prefetch_auth_cache_total", frozenset({("result", "hit")}))]
    assert auth == hits_before + 1


def test_tallied_job_metrics_land_as_observed() -> None:
    # A job's metrics wait in engine/metrics/tally.py until a flush: nothing shows before it,
    # everything after, in the buckets a direct observation would have used.
    from prometheus_client import REGISTRY, generate_latest

    from engine.metrics import prometheus, tally

    def read() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return samples(generate_latest(REGISTRY).decode())

    done = ("prefetch_operations_total", frozenset({("origin", "test"), ("status", "completed")}))
    fetch_le = ("prefetch_timeline_fetch_duration_seconds_bucket", frozenset({("le", "0.01")}))
    before = read()
    for seconds in (0.004, 0.01, 0.2):
        tally.observe(prometheus.FETCH_DURATION, seconds)
    tally.inc(prometheus.operations("test", True))
    tally.inc(prometheus.operations("test", True))
    assert read().get(done, 0.0) == before.get(done, 0.0)  # tallied, not published yet
    tally.flush()
    after = read()
    assert after[done] == before.get(done, 0.0) + 2
    assert after[fetch_le] == before[fetch_le] + 2  # 0.004 and 0.01 (le: on the bound)
    count = "prefetch_timeline_fetch_duration_seconds_count", frozenset()
    assert after[count] == before[count] + 3
    total = "prefetch_timeline_fetch_duration_seconds_sum", frozenset()
    assert after[total] == pytest.approx(before[total] + 0.214)
    tally.flush()  # nothing left: nothing added twice
    assert read()[done] == after[done]


async def test_unrouted_paths_share_one_label(api: ApiClient) -> None:
    labels = {"route": "unmatched", "method": "GET", "status": "404"}
    before = await value(api, "prefetch_http_requests_total", **labels)
    for path in ("/a", "/b/c", "/api/cachex"):
        assert (await api.call("GET", path)).status == 404
    await wait_value(api, "prefetch_http_requests_total", before + 3, **labels)


# --- upstreams, the CA and the auth cache ------------------------------------------------------


async def upstream_errors(api: ApiClient, upstream: str, kind: str) -> float:
    return await value(api, "prefetch_upstream_errors_total", upstream=upstream, kind=kind)


@pytest.mark.parametrize(
    ("prefix", "kind", "status"),
    [("0000dead-", "404", 404), ("0000fa11-", "5xx", 502), ("0000bad0-", "malformed", 502)],
)
async def test_timeline_errors_are_counted_by_kind(
    api: ApiClient, prefix: str, kind: str, status: int
) -> None:
    before = await upstream_errors(api, "timeline", kind)
    assert (await api.call("GET", f"/api/cache/{new_user(prefix)}")).status == status
    assert await upstream_errors(api, "timeline", kind) == before + 1


async def test_a_slow_timeline_counts_as_a_timeout(api: ApiClient) -> None:
    before = await upstream_errors(api, "timeline", "timeout")
    # Answers after 60 s; the test settings' PREFETCH_TIMEOUT is 1.5 s.
    assert (await api.call("GET", f"/api/cache/{new_user('0000510e-')}")).status == 504
    assert await upstream_errors(api, "timeline", "timeout") == before + 1


async def test_an_unreachable_timeline_counts_as_connect(settings: Settings) -> None:
    unreachable = settings.with_overrides(timeline_url=f"http://127.0.0.1:{closed_port()}")
    async with serve_api(unreachable) as api:
        before = await upstream_errors(api, "timeline", "connect")
        assert (await api.call("GET", f"/api/cache/{new_user()}")).status == 502
        assert await upstream_errors(api, "timeline", "connect") == before + 1


async def test_a_refused_service_token_counts_as_4xx(settings: Settings) -> None:
    async with serve_api(settings.with_overrides(service_token="not-a-token")) as api:
        before = await upstream_errors(api, "timeline", "4xx")
        refreshes = await value(api, "prefetch_token_refresh_total")
        assert (await api.call("GET", f"/api/cache/{new_user()}")).status == 502
        assert await upstream_errors(api, "timeline", "4xx") == before + 1
        assert await value(api, "prefetch_token_refresh_total") == refreshes + 1


async def test_ca_calls_and_the_auth_cache(api: ApiClient) -> None:
    async def counts() -> tuple[float, ...]:
        text = samples(await scrape_text(api))

        def get(name: str, **labels: str) -> float:
            return text.get((name, frozenset(labels.items())), 0.0)

        return (
            get("prefetch_auth_cache_total", result="hit"),
            get("prefetch_auth_cache_total", result="miss"),
            get("prefetch_ca_calls_total", outcome="valid"),
            get("prefetch_ca_calls_total", outcome="invalid"),
        )

    hits, misses, valid, invalid = await counts()
    reader = new_user()
    for _ in range(3):  # the app is new: one CA call, then its verdict from the cache
        assert (await api.call("GET", f"/api/cache/status/{reader}")).status == 200
    assert (await api.call("GET", f"/api/cache/{reader}", token="sandbox-expired")).status == 401
    assert await counts() == (hits + 2, misses + 2, valid + 1, invalid + 1)
    assert (await api.ca_stats())["validateCalls"] == 2


async def test_an_unreachable_ca_is_an_error_call(settings: Settings) -> None:
    async with serve_api(
        settings.with_overrides(ca_url=f"http://127.0.0.1:{closed_port()}")
    ) as api:
        errors = await value(api, "prefetch_ca_calls_total", outcome="error")
        connect = await upstream_errors(api, "ca", "connect")
        assert (await api.call("GET", f"/api/cache/{new_user()}")).status == 503
        assert await value(api, "prefetch_ca_calls_total", outcome="error") == errors + 1
        assert await upstream_errors(api, "ca", "connect") == connect + 1


async def test_every_error_kind_is_a_series_from_the_start(api: ApiClient) -> None:
    text = samples(await scrape_text(api))
    for upstream in ("timeline", "ca"):
        for kind in ("timeout", "connect", "5xx", "4xx", "404", "malformed"):
            key = (
                "prefetch_upstream_errors_total",
                frozenset({("upstream", upstream), ("kind", kind)}),
            )
            assert key in text


# --- the queue's depth --------------------------------------------------------------------------


async def test_queue_depth_by_state_and_priority_is_read_at_scrape_time(api: ApiClient) -> None:
    for _ in range(2):
        reply = await api.call(
            "POST",
            f"/api/prefetch/schedule/{new_user()}",
            json={"priority": "medium", "delay": 60_000},
        )
        assert reply.status == 202
    assert (
        await api.call("POST", f"/api/prefetch/schedule/{new_user()}", json={"priority": "high"})
    ).status == 202
    text = samples(await scrape_text(api))

    def depth(state: str, priority: str) -> float:
        return text[("prefetch_queue_depth", frozenset({("state", state), ("priority", priority)}))]

    assert depth("delayed", "medium") == 2
    assert depth("waiting", "high") == 1  # no worker runs in this test
    assert depth("waiting", "low") == 0 and depth("dead", "high") == 0
    assert text[("prefetch_queue_depth_up", frozenset())] == 1


async def test_metrics_still_answer_when_redis_does_not(settings: Settings) -> None:
    down = settings.with_overrides(redis_url=f"redis://127.0.0.1:{closed_port()}")
    async with serve_api(down) as api:
        text = samples(await scrape_text(api))
    assert text[("prefetch_queue_depth_up", frozenset())] == 0
    assert not [key for key in text if key[0] == "prefetch_queue_depth"]  # a gap, not zeros
    assert ("prefetch_cache_misses_total", frozenset()) in text


# --- /metrics and the event loop ----------------------------------------------------------------


async def test_scrapes_read_the_files_off_the_loop_one_at_a_time(
    api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow read of the metric files (a loaded disk, a pod of many processes) that cannot be
    # produced on demand: the render waits until the test lets it go.
    release = threading.Event()
    calls: list[int] = []
    real_render = scrape.render

    def slow_render(directory: str) -> tuple[bytes, str]:
        calls.append(threading.get_ident())
        release.wait(30)
        return real_render(directory)

    monkeypatch.setattr(scrape, "render", slow_render)
    scrapes = [asyncio.ensure_future(scrape_text(api)) for _ in range(3)]

    async def rendering() -> bool:
        return bool(calls)

    await eventually(rendering)
    # The loop still serves while the files are read (it would hang here otherwise).
    live = await asyncio.wait_for(api.call("GET", "/health/live", token=None), 10)
    assert live.status == 200
    assert not any(task.done() for task in scrapes)
    release.set()
    bodies = await asyncio.gather(*scrapes)
    assert len(calls) == 1 and calls[0] != threading.get_ident()  # one read, in a thread
    assert all("prefetch_http_requests_total" in body for body in bodies)


# --- the stats flush while Redis refuses --------------------------------------------------------


async def test_a_failing_stats_flush_warns_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="engine.metrics.daily")
    redis = FastRedis(f"redis://127.0.0.1:{closed_port()}", connect_timeout=0.2)
    stats = StatsRecorder(redis, 90, interval_s=0.02)
    stats.hit("hot")
    stats.start()
    try:

        def warnings() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "metrics flush failed" in r.getMessage()]

        await wait_for(warnings, 10, "the first flush warning")
        await holds_for(lambda: len(warnings()) == 1, 0.5, "one warning for ~25 failed flushes")
    finally:
        await stats.stop()
        await redis.close()


# --- the multiprocess directory -----------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_starting_process_removes_stale_files_and_its_own_pids(tmp_path: Path) -> None:
    dead, live, own = _dead_pid(), os.getppid(), os.getpid()
    names = [
        f"counter_{dead}.db",
        f"gauge_livesum_{dead}.db",
        f"histogram_{live}.db",
        f"gauge_livesum_{live}.db",
        f"counter_{own}.db",
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = metrics_dir.prepare(tmp_path, own_pid=own)
    assert sorted(removed) == sorted(
        [f"counter_{dead}.db", f"gauge_livesum_{dead}.db", f"counter_{own}.db"]
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"histogram_{live}.db", f"gauge_livesum_{live}.db", "notes.txt"])
    assert metrics_dir.prepare(tmp_path / "new" / "dir") == []  # created, empty


async def test_the_supervisor_marks_a_dead_worker_and_keeps_its_counters(
    tmp_path: Path, redis_url: str
) -> None:
    async with Engine.open(tmp_path, redis_url) as engine:
        supervisor = await engine.start_worker(PREFETCH_WORKER_COUNT="1")
        directory = tmp_path / "metrics"
        (worker_pid,) = supervisor.workers().values()
        first = user()
        await engine.jobs.schedule(first, "high")
        await wait_for(lambda: engine.count_cached("hot", [first]), 20, "the job to land")
        gauge = directory / f"gauge_livesum_{worker_pid}.db"
        counter = directory / f"counter_{worker_pid}.db"
        await wait_for(gauge.exists, 10, "the worker's jobs-in-flight gauge file")
        await wait_for(counter.exists, 10, "the worker's counter file")

        def completed() -> float:  # the job, published by the worker's tally within ~1 s
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(directory))
            found = samples(generate_latest(registry).decode())
            return found.get(("prefetch_queue_jobs_total", frozenset({("status", "completed")})), 0)

        await wait_for(lambda: completed() == 1, 10, "the worker's completed job counted")
        os.kill(worker_pid, signal.SIGKILL)
        await wait_for(lambda: not gauge.exists(), 10, "the dead worker's live gauge removed")
        assert counter.exists()  # its counted jobs stay in the pod's sums
        await wait_for(lambda: supervisor.workers(), 10, "the replacement worker")
        assert supervisor.workers()[1] != worker_pid

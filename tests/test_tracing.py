"""Tracing: the spans of a read, a read-through, a schedule and the job it becomes.

In-process spans go to the SDK's in-memory exporter. A job runs in a real `prefetch worker`
that exports over OTLP/HTTP, configured only by the standard OTEL_* variables, to a small
receiver in the test: the job's spans must continue the schedule's trace across the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from engine import tracing
from engine.settings import Settings
from engine.store.fastredis import FastRedis
from tests.conftest import new_user, serve_api
from tests.engine_support import DB_HOT, DB_QUEUE, DB_WARM, Engine, user, wait_for

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, every span kept in memory as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


def of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def server_span(exporter: InMemorySpanExporter, request_id: str) -> ReadableSpan:
    for span in exporter.get_finished_spans():
        attributes = span.attributes or {}
        if span.kind == SpanKind.SERVER and attributes.get("prefetch.request_id") == request_id:
            return span
    raise AssertionError(f"no server span for request {request_id}")


async def test_a_read_through_is_one_trace_from_the_request_to_redis(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    reader = new_user()
    async with serve_api(settings) as api:
        reply = await api.call("GET", f"/api/cache/{reader}", headers={"X-Request-Id": "rt-1"})
    assert reply.status == 200 and reply.body["meta"]["cached"] is False
    server = server_span(spans, "rt-1")
    assert server.name == "GET /api/cache/{userId}"
    assert (server.attributes or {})["http.response.status_code"] == 200
    trace = of_trace(spans, server.context.trace_id)
    (read,) = named(trace, "cache.read")
    (through,) = named(trace, "read-through")
    (fetch,) = named(trace, "timeline.fetch")
    assert parent_id(read) == parent_id(through) == server.context.span_id
    assert parent_id(fetch) == through.context.span_id and fetch.kind == SpanKind.CLIENT
    assert (read.attributes or {})["prefetch.tier"] == "miss"
    redis_spans = [s for s in trace if s.name.startswith("redis ")]
    # Both tiers looked up under the read; the generation read and the store under the
    # read-through.
    gets = [parent_id(s) for s in redis_spans if s.name == "redis GET"]
    assert gets.count(read.context.span_id) == 2
    under_through = {s.name for s in redis_spans if parent_id(s) == through.context.span_id}
    assert {"redis GET", "redis EVALSHA"} <= under_through
    assert all(s.kind == SpanKind.CLIENT for s in redis_spans)
    assert all((s.attributes or {})["db.system"] == "redis" for s in redis_spans)


async def test_a_hit_continues_the_callers_trace(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    reader = new_user()
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with serve_api(settings) as api:
        assert (await api.call("GET", f"/api/cache/{reader}")).status == 200
        reply = await api.call(
            "GET",
            f"/api/cache/{reader}",
            headers={"X-Request-Id": "hit-1", "traceparent": traceparent},
        )
    assert reply.status == 200 and reply.body["meta"]["cached"] is True
    server = server_span(spans, "hit-1")
    assert server.context.trace_id == int(TRACE_ID, 16)
    assert parent_id(server) == int(PARENT_ID, 16)
    trace = of_trace(spans, int(TRACE_ID, 16))
    (read,) = named(trace, "cache.read")
    assert (read.attributes or {})["prefetch.tier"] == "warm"
    assert not named(trace, "read-through")


async def test_tracing_off_makes_no_spans(settings: Settings) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Installed and removed again before the app starts: what a process with
    # OTEL_TRACES_EXPORTER=none has (no tracer, no tracing middleware).
    tracing.install(provider)
    tracing.uninstall()
    async with serve_api(settings) as api:
        assert (await api.call("GET", f"/api/cache/{new_user()}")).status == 200
    assert exporter.get_finished_spans() == ()
    assert tracing.message_options() == {}


# --- across the message: a worker process exports over OTLP ------------------------------


class Receiver:
    """An OTLP/HTTP trace endpoint: POST /v1/traces, protobuf, as the SDK's exporter sends."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "resource": resource,
                        }
                    )
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    await found.start()
    try:
        yield found
    finally:
        await found.stop()


async def test_a_scheduled_job_continues_the_schedules_trace_in_the_worker(
    tmp_path: Path, redis_url: str, spans: InMemorySpanExporter, receiver: Receiver
) -> None:
    async with Engine.open(tmp_path, redis_url) as engine:
        await engine.start_worker(
            PREFETCH_WORKER_COUNT="1",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_SERVICE_NAME="prefetch-under-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        assert engine.sandbox is not None
        settings = Settings().with_overrides(
            env="test",
            redis_url=redis_url,
            redis_configured=True,
            db_hot=DB_HOT,
            db_warm=DB_WARM,
            db_queue=DB_QUEUE,
            db_metrics=DB_QUEUE,
            timeline_url=engine.sandbox.timeline_url,
            ca_url=engine.sandbox.ca_url,
            service_token="sandbox-service",
            metrics_dir="",
        )
        scheduled = user()
        async with serve_api(settings) as api:
            reply = await api.call(
                "POST",
                f"/api/prefetch/schedule/{scheduled}",
                json={"priority": "high"},
                headers={"X-Request-Id": "sched-1"},
            )
        assert reply.status == 202
        server = server_span(spans, "sched-1")
        trace = of_trace(spans, server.context.trace_id)
        (schedule,) = named(trace, "schedule high")
        assert schedule.kind == SpanKind.PRODUCER
        assert parent_id(schedule) == server.context.span_id
        trace_hex = f"{server.context.trace_id:032x}"

        def job_spans() -> list[dict[str, Any]]:
            found = [s for s in receiver.spans if s["trace_id"] == trace_hex]
            names = {s["name"] for s in found}
            return found if {"job prefetch_high", "timeline.fetch"} <= names else []

        found = await wait_for(job_spans, 20, "the worker's spans of the job")
        (job,) = [s for s in found if s["name"] == "job prefetch_high"]
        assert job["parent_id"] == f"{schedule.context.span_id:016x}"
        assert job["resource"]["service.name"] == "prefetch-under-test"
        assert job["resource"]["prefetch.role"] == "worker"
        by_id = {s["span_id"]: s for s in found}

        def ancestors(span: dict[str, Any]) -> list[str]:
            chain = []
            while span["parent_id"] in by_id:
                span = by_id[span["parent_id"]]
                chain.append(span["name"])
            return chain

        (fetch,) = [s for s in found if s["name"] == "timeline.fetch"]
        assert ancestors(fetch) == ["prefetch", "job prefetch_high"]
        stored = [s for s in found if s["name"] == "redis EVALSHA" and "prefetch" in ancestors(s)]
        assert stored, "the store is a Redis span under the job's prefetch"
        assert await engine.count_cached("hot", [scheduled]) == 1


async def test_a_traced_pipeline_is_one_span(redis_url: str, spans: InMemorySpanExporter) -> None:
    client = FastRedis(redis_url, DB_HOT)
    try:
        with tracing.span("outer") as outer:
            assert outer is not None
            replies = await client.pipeline([("PING",), ("ECHO", "a"), ("ECHO", "b")])
        assert replies == [b"PONG", b"a", b"b"]
        (pipeline,) = named(list(spans.get_finished_spans()), "redis pipeline")
        assert (pipeline.attributes or {})["db.operation.batch.size"] == 3
        assert parent_id(pipeline) == outer.get_span_context().span_id
        with pytest.raises(Exception, match="unknown command"):
            await client.execute("NOSUCHCOMMAND")
        (failed,) = named(list(spans.get_finished_spans()), "redis NOSUCHCOMMAND")
        assert not failed.status.is_ok
    finally:
        await client.close()

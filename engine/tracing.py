"""OpenTelemetry tracing: off unless OTEL_TRACES_EXPORTER says otherwise, and free when off.

Spans: the API request (a server span, continuing an incoming `traceparent`), a cache read,
a read-through, a schedule (a producer span whose context travels in the Dramatiq message's
options under `trace`), the job that message becomes (a consumer span, its child, in the
worker that runs it), the prefetch inside a job, the timeline fetch and the CA call (client
spans that pass `traceparent` on), the scheduler's tick, and every Redis command or pipeline
sent through FastRedis as a client span below whichever of those is current.

Off (the default), `tracer` is None: each instrumented place tests that one module attribute
and goes its untraced way, so the read path pays a few attribute loads per request. On,
`session(settings)` builds a TracerProvider for the process (after fork: its exporter runs
a thread) with an OTLP/HTTP exporter (`otlp`, configured by the SDK from the standard
variables: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*, ...) or the
console exporter (`console`), and flushes it when the process's runtime closes. The provider
is this module's, not the global one, so tests can install one of their own (`install`).

The SDK and the exporter are the optional `tracing` dependency group; settings refuse an
exporter when they are missing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from engine import logs

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from engine.settings import Settings

INSTRUMENTATION: Final = "exprsn-prefetch"
MESSAGE_OPTION: Final = "trace"  # the Dramatiq message option that carries the context

tracer: Tracer | None = None
_provider: TracerProvider | None = None


def install(provider: TracerProvider) -> None:
    """Trace through `provider` from now on (the process's session, or a test's)."""
    global tracer, _provider
    _provider = provider
    tracer = provider.get_tracer(INSTRUMENTATION)


def uninstall() -> None:
    """Stop tracing (the provider is not shut down: its owner does that)."""
    global tracer, _provider
    tracer, _provider = None, None


def _exporter(kind: str) -> Any:
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


@contextlib.contextmanager
def session(settings: Settings) -> Iterator[None]:
    """Trace this process while the block runs, when an exporter is configured; flush after.

    With OTEL_TRACES_EXPORTER=none (the default) it changes nothing, so a provider that a
    test installed stays in place.
    """
    if settings.otel_traces_exporter == "none" or tracer is not None:
        yield
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": settings.otel_service_name,
            "service.instance.id": f"{os.uname().nodename}:{os.getpid()}",
            "prefetch.role": logs.role(),
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings.otel_traces_exporter)))
    install(provider)
    try:
        yield
    finally:
        uninstall()
        provider.shutdown()  # exports what is left


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def inject(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """The current span's context as W3C headers (`traceparent`), added to `carrier`."""
    carrier = {} if carrier is None else carrier
    if tracer is not None:
        _propagator().inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Any:
    """The context that `carrier` (headers, or a message's options) continues, or None."""
    if not carrier:
        return None
    return _propagator().extract(carrier)


def message_options() -> dict[str, Any]:
    """Options for a Dramatiq message that carry the current span's context (none when off)."""
    if tracer is None:
        return {}
    carrier = inject()
    return {MESSAGE_OPTION: carrier} if carrier else {}


def span(
    name: str,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    parent: Any = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around a block, current inside it; a no-op (yielding None) when tracing is off.

    `kind` is internal, server, client, producer or consumer; `parent` a context from
    `extract` (default: the current span). An exception leaving the block marks it failed.
    """
    if tracer is None:
        return contextlib.nullcontext()
    from opentelemetry.trace import SpanKind

    return tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind[kind.upper()],
        attributes=dict(attributes) if attributes else None,
    )


def job_span(message: Any) -> contextlib.AbstractContextManager[Span | None]:
    """The consumer span of one attempt of a Dramatiq message, continuing its schedule."""
    if tracer is None:
        return contextlib.nullcontext()
    options = message.options
    args = message.args
    attributes: dict[str, Any] = {
        "messaging.system": "dramatiq",
        "messaging.destination.name": message.queue_name,
        "messaging.message.id": message.message_id,
        "prefetch.job.attempt": int(options.get("retries", 0)) + 1,
    }
    if len(args) >= 2 and isinstance(args[1], str):
        attributes["prefetch.job.id"] = args[1]
    if args and isinstance(args[0], str):
        attributes["prefetch.user_id"] = args[0]
    elif args and isinstance(args[0], list):
        attributes["prefetch.batch.users"] = len(args[0])
    return span(
        f"job {message.actor_name}",
        "consumer",
        attributes,
        parent=extract(options.get(MESSAGE_OPTION)),
    )


def redis_span(
    commands: Sequence[Sequence[Any]], db: int
) -> contextlib.AbstractContextManager[Any]:
    """A client span for one Redis command, or for a pipeline of several (tracing on only)."""
    assert tracer is not None
    from opentelemetry.trace import SpanKind

    first = commands[0][0]
    operation = first.decode() if isinstance(first, bytes) else str(first)
    operation = operation.upper()
    attributes: dict[str, Any] = {"db.system": "redis", "db.redis.database_index": db}
    if len(commands) == 1:
        name = f"redis {operation}"
        attributes["db.operation.name"] = operation
    else:
        name = "redis pipeline"
        attributes["db.operation.name"] = "PIPELINE"
        attributes["db.operation.batch.size"] = len(commands)
    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes)

"""`prefetch api | worker | dev | sandbox`: the one entry point of every process role.

Settings are loaded here, once; a bad value prints one line and exits 2. Prometheus's
multiprocess directory must be in the environment before any metric exists, so the heavy
modules are imported only after `_prepare`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from engine import logs
from engine.errors import ConfigError, PortInUse, PrefetchError
from engine.metrics import metrics_dir
from engine.process import fork_child
from engine.settings import Settings, environment, load_settings, retired_warnings
from prefetch.args import build_parser
from prefetch.ports import ensure_ports_free

EXIT_CONFIG = 2
SANDBOX_TOKENS = (
    "sandbox-service",
    "sandbox-readonly",
    "sandbox-user-<uuid>",
    "sandbox-expired",
    "sandbox-revoked",
)


def main(argv: list[str] | None = None) -> int:
    """Run one role; the exit code is 0, 1 (a failure at run time) or 2 (bad setting, busy port)."""
    args = build_parser().parse_args(argv)
    env = environment()
    try:
        settings = load_settings(env)
        from sandbox.config import load_sandbox_settings

        load_sandbox_settings(env)  # fail at start, in every role, on a malformed knob
    except ConfigError as exc:
        print(f"prefetch: configuration error: {exc}", file=sys.stderr)
        # Docker reserves a health check's exit code 2: a probe is unhealthy (1), nothing else.
        return 1 if args.role == "probe" else EXIT_CONFIG
    if args.role == "probe":
        from prefetch.probe import run_probe

        return run_probe(settings, args.target)
    if args.role == "dev":
        settings = dev_bind_host(settings, env)
    try:
        ensure_ports_free(args.role, settings)
    except PortInUse as exc:
        print(f"prefetch {args.role}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    settings = _prepare(settings, args.role)
    log_start(args.role, settings, retired_warnings(env))
    try:
        if args.role == "api":
            return run_api(settings)
        if args.role == "worker":
            from engine.supervisor import run_supervisor

            return run_supervisor(settings)
        if args.role == "sandbox":
            from sandbox.server import run_sandbox

            return run_sandbox(settings, env)
        return run_dev(settings, env)
    except PortInUse as exc:  # taken between the check and the bind
        print(f"prefetch {args.role}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PrefetchError as exc:
        print(f"prefetch {args.role}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"prefetch {args.role}: a port is already in use: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG


def dev_bind_host(settings: Settings, env: dict[str, str]) -> Settings:
    """`prefetch dev` listens on 127.0.0.1 unless PREFETCH_SERVICE_HOST is set.

    The sandbox CA's `sandbox-service` token has every permission and is printed in the
    banner: a dev instance on 0.0.0.0 would let anyone on the network drive it.
    """
    if env.get("PREFETCH_SERVICE_HOST", "").strip():
        return settings
    return settings.with_overrides(service_host="127.0.0.1")


# The role a process logs as before a forked child renames itself (engine.process.set_title).
_ROLE_NAMES = {"api": "api", "worker": "supervisor", "sandbox": "sandbox", "dev": "dev"}


def _prepare(settings: Settings, role: str) -> Settings:
    """Logging, and the pod-wide Prometheus directory shared by the API and the workers."""
    fmt = settings.log_format or ("text" if role == "dev" else "json")
    # The logging HOWTO's optimisations: no caller frame lookup (we print no file or line),
    # no thread or multiprocessing names; an access log line per request pays for each.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logs.configure(settings.log_level, fmt, _ROLE_NAMES[role])
    # pika logs every connection step at INFO (each consumer, each publisher thread).
    logging.getLogger("pika").setLevel(
        max(logging.WARNING, logging.getLevelName(settings.log_level))
    )
    directory = settings.metrics_dir or str(
        Path(tempfile.gettempdir()) / f"prefetch-metrics-{settings.service_port}"
    )
    removed = metrics_dir.prepare(Path(directory))
    if removed:
        logging.getLogger("prefetch").info(
            "removed %d stale metric files from %s", len(removed), directory
        )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return settings.with_overrides(metrics_dir=directory, log_format=fmt)


def log_start(role: str, settings: Settings, warnings: list[str]) -> None:
    """One line saying what this role connects to (no secret in it), and retired settings."""
    log = logging.getLogger("prefetch")
    for warning in warnings:
        log.warning(warning)
    fields: dict[str, object] = {}
    if role in ("api", "worker", "dev"):
        fields["redis"] = logs.redact_url(settings.redis_url)
        fields["redis_cluster"] = settings.redis_cluster_mode
        fields["broker"] = logs.redact_url(settings.queue_redis_url)
        fields["dbs"] = (
            f"hot={settings.db_hot} warm={settings.db_warm} "
            f"queue={settings.db_queue} metrics={settings.db_metrics}"
        )
    fields["timeline"] = settings.timeline_url
    fields["ca"] = settings.ca_url
    if role in ("api", "dev"):
        fields["listen"] = f"{settings.service_host}:{settings.service_port}"
        fields["api_workers"] = settings.api_workers
        fields["access_log"] = settings.access_log_sample
    if role in ("worker", "dev"):
        fields["workers"] = settings.worker_count
        fields["job_concurrency"] = settings.job_concurrency
        fields["health_port"] = settings.health_port
    fields["metrics_dir"] = settings.metrics_dir
    fields["tracing"] = settings.otel_traces_exporter
    summary = " ".join(f"{name}={value}" for name, value in fields.items())
    log.info("starting %s: %s", role, summary, extra={"config": fields})


def run_api(settings: Settings) -> int:
    """`API_WORKERS` processes serving the port together (SO_REUSEPORT)."""
    from engine.process import set_title

    set_title("prefetch: api")  # before forking, so that every API process carries it
    if settings.api_workers == 1:
        return _serve_api(settings)
    pids = [fork_child("api", lambda: _serve_api(settings)) for _ in range(settings.api_workers)]
    return _wait_children(pids, settings.metrics_dir)


def _serve_api(settings: Settings) -> int:
    import uvloop
    from aiohttp import web

    from api import create_app
    from api.server import make_runner, raise_file_limit
    from engine.process import settle_heap, stop_on_signals

    # Before the runner sizes its connection limit on it.
    raise_file_limit()

    async def serve() -> None:
        runner = make_runner(create_app(settings), settings)
        await runner.setup()
        site = web.TCPSite(
            runner,
            settings.service_host,
            settings.service_port,
            reuse_port=settings.api_workers > 1,
            backlog=1024,
        )
        await site.start()
        logging.getLogger("api").info(
            "API on http://%s:%d (at most %d connections)",
            settings.service_host,
            settings.service_port,
            runner.limits.max_connections,
        )
        settle_heap()  # the app, its Runtime and the contract document stay for good
        with stop_on_signals() as stop:
            await stop.wait()
            await runner.cleanup()

    uvloop.run(serve())
    return 0


def run_dev(settings: Settings, env: dict[str, str]) -> int:
    """Everything on one machine: embedded Valkey, sandbox upstreams, supervisor and API."""
    from engine.process import set_title
    from engine.supervisor import run_supervisor
    from prefetch.embedded import EmbeddedRedis
    from sandbox.server import run_sandbox

    set_title("prefetch: dev")
    embedded: EmbeddedRedis | None = None
    if not settings.redis_configured:
        embedded = EmbeddedRedis().start()
        settings = settings.with_overrides(redis_url=embedded.url, redis_configured=True)
    if not settings.service_token and not settings.service_token_path:
        settings = settings.with_overrides(service_token="sandbox-service")
    pids: list[int] = []
    try:
        pids.append(fork_child("sandbox", lambda: run_sandbox(settings, env)))
        _wait_for_port(settings.timeline_url)
        pids.append(fork_child("supervisor", lambda: run_supervisor(settings)))
        pids.append(fork_child("api", lambda: run_api(settings)))
        _print_banner(settings, embedded)
        return _wait_children(pids, settings.metrics_dir)
    finally:
        if embedded is not None:
            embedded.stop()


def _print_banner(settings: Settings, embedded: object | None) -> None:
    base = f"http://127.0.0.1:{settings.service_port}"
    redis_note = "embedded Valkey" if embedded is not None else "configured"
    lines = [
        "",
        "exprsn-prefetch dev is up (Ctrl-C stops everything)",
        f"  API       {base}",
        f"  Redis     {settings.redis_url} ({redis_note})",
        f"  timeline  {settings.timeline_url}  (sandbox)",
        f"  CA        {settings.ca_url}  (sandbox)",
        f"  tokens    {', '.join(SANDBOX_TOKENS)}",
    ]
    if settings.health_port:
        lines.append(f"  workers   http://127.0.0.1:{settings.health_port}/ready  (health port)")
    lines += [
        "  try:",
        f"    curl -s -H 'Authorization: Bearer sandbox-service' "
        f"{base}/api/cache/550e8400-e29b-41d4-a716-446655440000",
        "",
    ]
    print("\n".join(lines), flush=True)


def _wait_children(pids: list[int], metrics_dir: str) -> int:
    """Forward SIGTERM/SIGINT to the children and wait for all of them."""
    signals = 0

    def forward(signum: int, frame: object) -> None:
        nonlocal signals
        signals += 1
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM if signals == 1 else signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    alive = set(pids)
    while alive:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid in alive:
            alive.discard(pid)
            _mark_dead(pid, metrics_dir)
            code = os.waitstatus_to_exitcode(status)
            worst = worst or (code if code > 0 else 0)
            if not signals:  # one part died on its own: stop the rest, like Ctrl-C
                forward(signal.SIGTERM, None)
    return worst


def _mark_dead(pid: int, directory: str) -> None:
    """A child's live gauges leave the pod's sums (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _wait_for_port(url: str, timeout: float = 10.0) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 0.2):
                return
        except OSError:
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())

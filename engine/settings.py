"""Configuration: read once from the environment (and `.env`) into a frozen, typed object.

Nothing else in the code base reads the environment. A malformed value raises ConfigError
with one line naming the variable and the accepted form; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from engine import settings_parse as parsers
from engine.cpus import available_cpus
from engine.errors import ConfigError

PRIORITIES = ("high", "medium", "low")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service; see `.env.example` for the documentation of each."""

    env: str = "development"
    service_host: str = "0.0.0.0"
    service_port: int = 3005
    api_workers: int = 1
    health_port: int = 0
    api_header_timeout_ms: int = 10_000
    api_body_timeout_ms: int = 10_000
    api_max_connections: int = 4_096
    api_local_cache_mb: int = 0  # the API's tracked copy of read entries (0: off; tuning.md)
    worker_count: int = field(default_factory=available_cpus)
    job_concurrency: int = 100
    batch_size: int = 50
    redis_url: str = "redis://127.0.0.1:6379"
    redis_configured: bool = False
    redis_cluster_mode: bool = False
    broker_url: str = ""  # empty: the queue lives in the cache's Redis (REDIS_DB_QUEUE)
    broker_queue_type: str = "quorum"
    broker_rehold_ms: int = 900_000
    db_hot: int = 0
    db_warm: int = 1
    db_queue: int = 2
    db_metrics: int = 3
    ca_url: str = "http://127.0.0.1:3000"
    timeline_url: str = "http://127.0.0.1:3004"
    auth_service_url: str = "http://127.0.0.1:3001"
    timeline_path: str = "/api/timeline/user/{userId}"
    hot_ttl_ms: int = 300_000
    warm_ttl_ms: int = 900_000
    cold_ttl_ms: int = 3_600_000
    enable_activity_based: bool = True
    enable_event_triggered: bool = True
    enable_predictive: bool = False
    activity_check_interval_ms: int = 60_000
    activity_window_ms: int = 300_000  # 15 min refetched after most sessions (tuning.md)
    activity_high_percent: int = 20
    activity_refresh_lead_ms: int = 10_000
    scheduler_lease_ttl_ms: int = 15_000
    predictive_lead_ms: int = 600_000
    predictive_hold_ms: int = 600_000
    predictive_coverage: float = 3.0
    predictive_threshold: float = 0.9
    predictive_ttl_ms: int = 7_200_000
    predictive_half_life_ms: int = 14 * 86_400_000
    predictive_hour_ms: int = 3_600_000
    predictive_day_offset_ms: int = 0
    max_timeline_size: int = 100
    prefetch_timeout_ms: int = 10_000
    job_deadline_ms: int = 0  # 0: derived from prefetch_timeout_ms (see job_deadline_s)
    prefetch_max_attempts: int = 3
    prefetch_backoff_ms: int = 2_000
    prefetch_shutdown_timeout_ms: int = 30_000
    service_token: str = ""
    service_token_path: str = ""
    auth_cache_ttl_ms: int = 30_000
    auth_cache_size: int = 10_000
    ca_timeout_ms: int = 2_000
    cache_compression: str = "gzip"
    queue_prefetch: int = 200
    delay_queue_prefetch: int = 1_000
    queue_backlog_degraded: int = 500
    health_memory_limit_mb: int = 400
    metrics_retention_days: int = 90
    metrics_dir: str = ""
    log_level: str = "INFO"
    log_format: str = ""  # json | text; empty: the role's default (text for `prefetch dev`)
    access_log_sample: float = 1.0  # share of API requests with an access log line (0: off)
    otel_traces_exporter: str = "none"  # none | otlp | console: tracing is off unless set
    otel_service_name: str = "exprsn-prefetch"

    @property
    def hot_ttl_s(self) -> int:
        return max(1, self.hot_ttl_ms // 1000)

    @property
    def warm_ttl_s(self) -> int:
        return max(1, self.warm_ttl_ms // 1000)

    @property
    def job_deadline_s(self) -> float:
        """How long one user's prefetch in a job may take in all: PREFETCH_JOB_DEADLINE, else
        twice PREFETCH_TIMEOUT (a fetch retried once with a fresh token) plus 5 s for Redis."""
        if self.job_deadline_ms:
            return self.job_deadline_ms / 1000
        return (2 * self.prefetch_timeout_ms + 5_000) / 1000

    @property
    def broker_kind(self) -> str:
        """`rabbitmq` for an amqp:// or amqps:// BROKER_URL, else `redis`."""
        return "rabbitmq" if self.broker_url.startswith(("amqp://", "amqps://")) else "redis"

    @property
    def queue_redis_url(self) -> str:
        """The Redis of the queue role (pending marks, failed list, counters, the scheduler
        lease): a Redis BROKER_URL, else the cache's Redis. Its DB is `db_queue` unless the
        URL names one."""
        if self.broker_url and self.broker_kind == "redis":
            return self.broker_url
        return self.redis_url

    def ttl_ms(self, tier: str) -> int:
        return self.hot_ttl_ms if tier == "hot" else self.warm_ttl_ms

    def entry_ttl_ms(self, tier: str, origin: str | None) -> int:
        """The TTL of an entry stored in `tier` by a prefetch of `origin`: the tier's, but a
        predictive prefetch's warm entry lives PREDICTIVE_TTL (at least the warm TTL), since
        it must last through a habit's window, not a session (README, predictive)."""
        if tier == "warm" and origin == "predictive":
            return max(self.predictive_ttl_ms, self.warm_ttl_ms)
        return self.ttl_ms(tier)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests and `prefetch dev` use it)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


# variable -> (field, parser). Several seed names map to one field where they are aliases.
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "ENV": ("env", parsers.choice("development", "production", "test")),
    "NODE_ENV": ("env", parsers.choice("development", "production", "test")),
    "PREFETCH_SERVICE_HOST": ("service_host", parsers.text),
    "PREFETCH_SERVICE_PORT": ("service_port", parsers.PORT),
    "API_WORKERS": ("api_workers", parsers.int_in(1, 64)),
    "PREFETCH_HEALTH_PORT": ("health_port", parsers.int_in(0, 65535)),
    "API_HEADER_TIMEOUT": ("api_header_timeout_ms", parsers.int_in(100, 600_000)),
    "API_BODY_TIMEOUT": ("api_body_timeout_ms", parsers.int_in(100, 600_000)),
    "API_MAX_CONNECTIONS": ("api_max_connections", parsers.int_in(16, 1_000_000)),
    "API_LOCAL_CACHE_MB": ("api_local_cache_mb", parsers.int_in(0, 4_096)),
    "PREFETCH_WORKER_COUNT": ("worker_count", parsers.int_in(1, 256)),
    "PREFETCH_JOB_CONCURRENCY": ("job_concurrency", parsers.int_in(1, 10_000)),
    "PREFETCH_BATCH_SIZE": ("batch_size", parsers.int_in(1, 1_000)),
    "REDIS_CLUSTER_MODE": ("redis_cluster_mode", parsers.boolean),
    "BROKER_URL": ("broker_url", parsers.broker_url),
    "BROKER_QUEUE_TYPE": ("broker_queue_type", parsers.choice("quorum", "classic")),
    "BROKER_REHOLD_MS": ("broker_rehold_ms", parsers.int_in(100, 86_400_000)),
    "REDIS_DB_HOT": ("db_hot", parsers.DB),
    "REDIS_DB_WARM": ("db_warm", parsers.DB),
    "REDIS_DB_QUEUE": ("db_queue", parsers.DB),
    "REDIS_DB_METRICS": ("db_metrics", parsers.DB),
    "CA_URL": ("ca_url", parsers.http_url),
    "TIMELINE_SERVICE_URL": ("timeline_url", parsers.http_url),
    "AUTH_SERVICE_URL": ("auth_service_url", parsers.http_url),
    "TIMELINE_PATH": ("timeline_path", parsers.path_template),
    "HOT_CACHE_TTL": ("hot_ttl_ms", parsers.MS),
    "WARM_CACHE_TTL": ("warm_ttl_ms", parsers.MS),
    "COLD_CACHE_TTL": ("cold_ttl_ms", parsers.MS),
    "ENABLE_ACTIVITY_BASED": ("enable_activity_based", parsers.boolean),
    "ENABLE_EVENT_TRIGGERED": ("enable_event_triggered", parsers.boolean),
    "ENABLE_PREDICTIVE": ("enable_predictive", parsers.boolean),
    "ACTIVITY_CHECK_INTERVAL": ("activity_check_interval_ms", parsers.int_in(1_000, 86_400_000)),
    "ACTIVITY_WINDOW": ("activity_window_ms", parsers.int_in(1_000, 604_800_000)),
    "ACTIVITY_HIGH_PERCENT": ("activity_high_percent", parsers.int_in(0, 100)),
    "ACTIVITY_REFRESH_LEAD": ("activity_refresh_lead_ms", parsers.int_in(0, 3_600_000)),
    "SCHEDULER_LEASE_TTL": ("scheduler_lease_ttl_ms", parsers.int_in(1_000, 600_000)),
    "PREDICTIVE_LEAD_TIME": ("predictive_lead_ms", parsers.int_in(0, 86_400_000)),
    "PREDICTIVE_HOLD_TIME": ("predictive_hold_ms", parsers.int_in(0, 86_400_000)),
    "PREDICTIVE_COVERAGE": ("predictive_coverage", parsers.float_in(0.0, 10.0)),
    "PREDICTIVE_TTL": ("predictive_ttl_ms", parsers.MS),
    "PREDICTIVE_THRESHOLD": ("predictive_threshold", parsers.float_in(0.01, 1_000.0)),
    "PREDICTIVE_HALF_LIFE": ("predictive_half_life_ms", parsers.int_in(3_600_000, 31_536_000_000)),
    "PREDICTIVE_HOUR": ("predictive_hour_ms", parsers.int_in(1_000, 3_600_000)),
    "PREDICTIVE_DAY_OFFSET": (
        "predictive_day_offset_ms",
        parsers.int_in(-604_800_000, 604_800_000),
    ),
    "MAX_TIMELINE_SIZE": ("max_timeline_size", parsers.int_in(1, 1_000)),
    "PREFETCH_TIMEOUT": ("prefetch_timeout_ms", parsers.int_in(100, 600_000)),
    "PREFETCH_JOB_DEADLINE": ("job_deadline_ms", parsers.int_in(0, 3_600_000)),
    "PREFETCH_MAX_ATTEMPTS": ("prefetch_max_attempts", parsers.int_in(1, 20)),
    "PREFETCH_BACKOFF_MS": ("prefetch_backoff_ms", parsers.int_in(0, 3_600_000)),
    "PREFETCH_SHUTDOWN_TIMEOUT": ("prefetch_shutdown_timeout_ms", parsers.int_in(0, 600_000)),
    "SERVICE_CERTIFICATE_TOKEN": ("service_token", parsers.text),
    "SERVICE_TOKEN_PATH": ("service_token_path", parsers.optional_path),
    "AUTH_CACHE_TTL": ("auth_cache_ttl_ms", parsers.int_in(0, 3_600_000)),
    "AUTH_CACHE_SIZE": ("auth_cache_size", parsers.int_in(1, 10_000_000)),
    "CA_TIMEOUT": ("ca_timeout_ms", parsers.int_in(50, 60_000)),
    "CACHE_COMPRESSION": ("cache_compression", parsers.choice("gzip", "none")),
    "QUEUE_PREFETCH": ("queue_prefetch", parsers.int_in(1, 100_000)),
    "DELAY_QUEUE_PREFETCH": ("delay_queue_prefetch", parsers.int_in(1, 1_000_000)),
    "QUEUE_BACKLOG_DEGRADED": ("queue_backlog_degraded", parsers.int_in(1, 10_000_000)),
    "HEALTH_MEMORY_LIMIT_MB": ("health_memory_limit_mb", parsers.int_in(16, 1_048_576)),
    "METRICS_RETENTION_DAYS": ("metrics_retention_days", parsers.int_in(1, 3_650)),
    "PREFETCH_METRICS_DIR": ("metrics_dir", parsers.text),
    "LOG_LEVEL": ("log_level", parsers.log_level),
    "LOG_FORMAT": ("log_format", parsers.choice("json", "text")),
    "ACCESS_LOG": ("access_log_sample", parsers.access_log),
    # OpenTelemetry's own names; the SDK reads the rest (OTEL_EXPORTER_OTLP_ENDPOINT, ...).
    "OTEL_TRACES_EXPORTER": ("otel_traces_exporter", parsers.choice("none", "otlp", "console")),
    "OTEL_SERVICE_NAME": ("otel_service_name", parsers.text),
}
# Seed names that no longer configure anything: each still starts, with this warning logged.
RETIRED: dict[str, str] = {
    "LOG_DIR": (
        "LOG_DIR is ignored: every process logs to stderr (JSON lines), for the container "
        "runtime or systemd to collect; redirect stderr to keep a file"
    ),
}
_REDIS_PARTS = ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD")
# Names we read elsewhere (sandbox knobs, Prometheus) that must not trip the unknown-name check.
_OTHER_KNOWN: set[str] = set()


def retired_warnings(env: Mapping[str, str]) -> list[str]:
    """The warnings for retired variables that `env` sets (see RETIRED)."""
    return [text for name, text in RETIRED.items() if env.get(name, "").strip()]


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional quotes, `export ` prefix."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {line[:40]!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


def environment(cwd: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment over the `.env` of the working directory (the process wins)."""
    env = dict(os.environ if base is None else base)
    dotenv = (cwd or Path.cwd()) / ".env"
    if dotenv.is_file():
        for key, value in read_dotenv(dotenv).items():
            env.setdefault(key, value)
    return env


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build Settings from a mapping of variables; raise ConfigError on the first bad value."""
    values: dict[str, Any] = {}
    for name, (attr, parse) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None or (raw.strip() == "" and attr != "service_token"):
            continue
        try:
            values[attr] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid: expected {exc}") from None
    known = set(_VARIABLES) | set(_REDIS_PARTS) | _OTHER_KNOWN
    for name in env:
        if name.startswith("PREFETCH_") and name not in known:
            raise ConfigError(f"{name} is not a known setting (see .env.example)")
    values.update(_redis_location(env))
    settings = Settings(**values)
    if settings.redis_cluster_mode:
        _check_cluster(settings)
    if settings.otel_traces_exporter != "none":
        _check_tracing(settings.otel_traces_exporter)
    return settings


def _check_tracing(exporter: str) -> None:
    """An exporter needs the `tracing` dependency group; say so at start, not in a worker."""
    from importlib.util import find_spec

    needed = ["opentelemetry.sdk"]
    if exporter == "otlp":
        needed.append("opentelemetry.exporter.otlp.proto.http")
    for module in needed:
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={exporter} needs the tracing extra: expected "
                f"{module} installed (pip install 'exprsn-prefetch[tracing]'), or none"
            )


def _check_cluster(settings: Settings) -> None:
    """A Cluster holds the cache; the queue needs a single node of its own (Dramatiq's
    scripts touch keys of many slots), named by BROKER_URL."""
    if not settings.broker_url or settings.broker_kind != "redis":
        # With RabbitMQ the pending marks, failed list and lease would live on the Cluster,
        # whose scripts (rabbit_outcome.lua, the fence) touch keys of many slots.
        raise ConfigError(
            "REDIS_CLUSTER_MODE=true needs BROKER_URL=redis://...: expected the job queue's "
            "own single-node Redis (redis://host:port/db), which the queue's scripts need"
        )
    if urlsplit(settings.redis_url).scheme == "unix":
        raise ConfigError(
            "REDIS_CLUSTER_MODE=true needs REDIS_URL=redis:// or rediss:// (a seed node of the "
            "Cluster), not a unix socket"
        )


def _redis_location(env: Mapping[str, str]) -> dict[str, Any]:
    url = env.get("REDIS_URL", "").strip()
    host = env.get("REDIS_HOST", "").strip()
    port_raw = env.get("REDIS_PORT", "").strip()
    password = env.get("REDIS_PASSWORD", "")
    if url:
        try:
            return {"redis_url": parsers.redis_url(url), "redis_configured": True}
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL={url!r} is not valid: expected {exc}") from None
    if not host and not port_raw:
        return {}
    port = 6379
    if port_raw:
        try:
            port = parsers.PORT(port_raw)
        except ValueError as exc:
            raise ConfigError(f"REDIS_PORT={port_raw!r} is not valid: expected {exc}") from None
    # Quoted: a password may hold any of the URL's own delimiters (p@ss/word, a:b, 50%).
    auth = f":{quote(password, safe='')}@" if password else ""
    url = f"redis://{auth}{host or '127.0.0.1'}:{port}"
    try:
        return {"redis_url": parsers.redis_url(url), "redis_configured": True}
    except ValueError:
        raise ConfigError(
            "REDIS_HOST/REDIS_PORT/REDIS_PASSWORD are not valid: expected a host name or address"
        ) from None

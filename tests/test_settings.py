"""Configuration: defaults, aliases, `.env`, and one clear line for every malformed value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.settings import Settings, environment, load_settings


def test_defaults_match_the_seed() -> None:
    settings = load_settings({})
    assert settings.service_port == 3005
    assert (settings.hot_ttl_ms, settings.warm_ttl_ms, settings.cold_ttl_ms) == (
        300_000,
        900_000,
        3_600_000,
    )
    assert (settings.db_hot, settings.db_warm) == (0, 1)
    assert settings.job_concurrency == 100
    assert settings.batch_size == 50
    assert settings.max_timeline_size == 100
    assert settings.prefetch_timeout_ms == 10_000
    assert settings.timeline_path == "/api/timeline/user/{userId}"
    assert settings.redis_configured is False


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.service_port = 1  # type: ignore[misc]


def test_node_env_is_an_alias_of_env() -> None:
    assert load_settings({"NODE_ENV": "production"}).env == "production"


def test_redis_url_wins_over_host_and_port() -> None:
    settings = load_settings(
        {"REDIS_URL": "rediss://cache:6380", "REDIS_HOST": "other", "REDIS_PORT": "1"}
    )
    assert settings.redis_url == "rediss://cache:6380"
    assert settings.redis_configured


def test_host_port_and_password_build_a_url() -> None:
    settings = load_settings({"REDIS_HOST": "cache", "REDIS_PORT": "6390", "REDIS_PASSWORD": "s"})
    assert settings.redis_url == "redis://:s@cache:6390"


@pytest.mark.parametrize("password", ["p@ss/word", "a:b", "50%off", "#?&=", " spaced "])
def test_a_password_is_quoted_into_the_url(password: str) -> None:
    from redis import ConnectionPool

    from engine.store.endpoint import RedisAddress

    env = {"REDIS_HOST": "cache", "REDIS_PORT": "6390", "REDIS_PASSWORD": password}
    url = load_settings(env).redis_url
    address = RedisAddress.parse(url)
    assert (address.host, address.port, address.password) == ("cache", 6390, password)
    pool = ConnectionPool.from_url(url)  # Dramatiq's client reads the same URL
    assert pool.connection_kwargs["password"] == password
    assert pool.connection_kwargs["host"] == "cache"


def test_api_limits_have_defaults_and_bounds() -> None:
    settings = load_settings({})
    assert (settings.api_header_timeout_ms, settings.api_body_timeout_ms) == (10_000, 10_000)
    assert settings.api_max_connections == 4_096
    tuned = load_settings(
        {"API_HEADER_TIMEOUT": "500", "API_BODY_TIMEOUT": "2000", "API_MAX_CONNECTIONS": "64"}
    )
    assert (tuned.api_header_timeout_ms, tuned.api_body_timeout_ms) == (500, 2000)
    assert tuned.api_max_connections == 64


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PREFETCH_SERVICE_PORT", "abc", "an integer from 1 to 65535"),
        ("PREFETCH_SERVICE_PORT", "70000", "an integer from 1 to 65535"),
        ("HOT_CACHE_TTL", "-5", "an integer from 1 to 86400000"),
        ("ENABLE_PREDICTIVE", "maybe", "true or false"),
        ("CA_URL", "ftp://ca", "an http:// or https:// URL"),
        ("REDIS_URL", "localhost:6379", "a redis://, rediss:// or unix:// URL"),
        ("REDIS_URL", "redis://cache:6379/?socket_timeout=abc", "whose options parse"),
        ("REDIS_PORT", "six", "an integer from 1 to 65535"),
        ("TIMELINE_PATH", "/timeline", "a path starting with / that contains {userId}"),
        ("CACHE_COMPRESSION", "brotli", "one of gzip|none"),
        ("LOG_LEVEL", "loud", "one of debug|info|warn|warning|error|critical"),
        ("ACTIVITY_HIGH_PERCENT", "101", "an integer from 0 to 100"),
        ("ACTIVITY_REFRESH_LEAD", "-1", "an integer from 0 to 3600000"),
        ("SCHEDULER_LEASE_TTL", "500", "an integer from 1000 to 600000"),
        ("PREDICTIVE_LEAD_TIME", "soon", "an integer from 0 to 86400000"),
        ("PREDICTIVE_HOLD_TIME", "1.5", "an integer from 0 to 86400000"),
        ("PREDICTIVE_THRESHOLD", "nan", "a number from 0.01 to 1000.0"),
        ("PREDICTIVE_THRESHOLD", "0", "a number from 0.01 to 1000.0"),
        ("PREDICTIVE_HALF_LIFE", "60000", "an integer from 3600000 to 31536000000"),
        ("API_HEADER_TIMEOUT", "0", "an integer from 100 to 600000"),
        ("API_BODY_TIMEOUT", "soon", "an integer from 100 to 600000"),
        ("API_MAX_CONNECTIONS", "4", "an integer from 16 to 1000000"),
        ("HEALTH_MEMORY_LIMIT_MB", "1G", "an integer from 16 to 1048576"),
        ("REDIS_URL", "rediss://cache/?ssl_cert_reqs=sometimes", "whose options parse"),
        ("BROKER_URL", "kafka://queue:9092", "a redis://, rediss://, unix://, amqp:// or amqps://"),
        ("BROKER_URL", "amqp://rabbit:5672/?heartbeat=often", "an amqp:// or amqps:// URL whose"),
        ("BROKER_URL", "redis://queue:6379/?socket_timeout=abc", "whose options parse"),
        ("BROKER_QUEUE_TYPE", "stream", "one of quorum|classic"),
    ],
)
def test_a_malformed_value_names_the_variable_and_the_form(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}=")
    assert expected in message
    assert "\n" not in message


def test_the_queue_follows_broker_url() -> None:
    cache_only = load_settings({"REDIS_URL": "redis://cache:6379"})
    assert (cache_only.broker_kind, cache_only.queue_redis_url) == ("redis", "redis://cache:6379")
    own_redis = load_settings(
        {"REDIS_URL": "redis://cache:6379", "BROKER_URL": "redis://queue:6380/4"}
    )
    assert (own_redis.broker_kind, own_redis.queue_redis_url) == ("redis", "redis://queue:6380/4")
    rabbit = load_settings(
        {"REDIS_URL": "redis://cache:6379", "BROKER_URL": "amqps://u:p%40ss@rabbit:5671/prod"}
    )
    assert rabbit.broker_kind == "rabbitmq"
    assert rabbit.queue_redis_url == "redis://cache:6379", "marks and records stay in Redis"
    assert rabbit.broker_queue_type == "quorum"


async def test_the_queue_role_is_on_the_brokers_redis() -> None:
    from engine.runtime import redis_clients

    settings = load_settings(
        {
            "REDIS_URL": "redis://cache:6379",
            "BROKER_URL": "redis://queue:6380",
            "REDIS_DB_QUEUE": "5",
        }
    )
    clients = redis_clients(settings)
    assert (clients["queue"].address.host, clients["queue"].address.port) == ("queue", 6380)
    assert clients["queue"].address.db == 5
    assert clients["hot"].address.host == clients["metrics"].address.host == "cache"
    for client in {id(c): c for c in clients.values()}.values():
        await client.close()


def test_strategy_knobs_are_read() -> None:
    settings = load_settings(
        {
            "ACTIVITY_HIGH_PERCENT": "35",
            "ACTIVITY_REFRESH_LEAD": "5000",
            "SCHEDULER_LEASE_TTL": "9000",
            "PREDICTIVE_LEAD_TIME": "120000",
            "PREDICTIVE_HOLD_TIME": "300000",
            "PREDICTIVE_THRESHOLD": "1.5",
            "PREDICTIVE_HALF_LIFE": "604800000",
        }
    )
    assert (settings.activity_high_percent, settings.activity_refresh_lead_ms) == (35, 5000)
    assert settings.scheduler_lease_ttl_ms == 9000
    assert (settings.predictive_lead_ms, settings.predictive_hold_ms) == (120_000, 300_000)
    assert settings.predictive_threshold == 1.5
    assert settings.predictive_half_life_ms == 604_800_000


def test_a_misspelt_prefetch_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="PREFETCH_WORKERCOUNT is not a known setting"):
        load_settings({"PREFETCH_WORKERCOUNT": "4"})


def test_cluster_mode_without_a_queue_node_is_refused_rather_than_ignored() -> None:
    with pytest.raises(ConfigError, match="REDIS_CLUSTER_MODE=true needs BROKER_URL"):
        load_settings({"REDIS_CLUSTER_MODE": "true"})


def test_dotenv_is_read_and_the_process_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\nexport HOT_CACHE_TTL=1000\nWARM_CACHE_TTL='2000'\nMAX_TIMELINE_SIZE=7 # note\n"
    )
    env = environment(tmp_path, base={"WARM_CACHE_TTL": "3000"})
    settings = load_settings(env)
    assert (settings.hot_ttl_ms, settings.warm_ttl_ms, settings.max_timeline_size) == (
        1000,
        3000,
        7,
    )


def test_a_malformed_dotenv_line_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HOT_CACHE_TTL\n")
    with pytest.raises(ConfigError, match=r"\.env:1"):
        environment(tmp_path, base={})


def test_env_example_documents_every_variable_and_loads() -> None:
    root = Path(__file__).resolve().parent.parent
    example = (root / ".env.example").read_text()
    from engine import settings as module

    for name in module._VARIABLES:
        assert name in example, f"{name} is missing from .env.example"
    load_settings(module.read_dotenv(root / ".env.example"))


@pytest.mark.parametrize("role", ["api", "worker", "sandbox", "dev"])
def test_every_role_stops_with_one_line_on_a_bad_value(role: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prefetch.cli", role],
        env={"PATH": "/usr/bin:/bin", "PREFETCH_SERVICE_PORT": "abc"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "PREFETCH_SERVICE_PORT='abc'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_bad_sandbox_knob_stops_the_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prefetch.cli", "sandbox"],
        env={"PATH": "/usr/bin:/bin", "SANDBOX_ERROR_RATE": "lots"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "SANDBOX_ERROR_RATE" in proc.stderr
    assert "Traceback" not in proc.stderr

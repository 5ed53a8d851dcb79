"""The value parsers of the settings (engine/settings.py): each takes the raw text of one
variable and returns the typed value, or raises ValueError naming the accepted form (which
load_settings turns into a ConfigError naming the variable)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from engine.errors import ConfigError


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return value

    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"a number from {lo} to {hi}") from None
        if not lo <= value <= hi:  # also refuses nan
            raise ValueError(f"a number from {lo} to {hi}")
        return value

    return parse


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def choice(*options: str, lower: bool = True) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower() if lower else raw.strip()
        if value not in options:
            raise ValueError("one of " + "|".join(options))
        return value

    return parse


def http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("an http:// or https:// URL with a numeric port") from None
    return value


def redis_url(raw: str) -> str:
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("a redis://, rediss:// or unix:// URL")
    # Both clients must accept it: redis-py (Dramatiq's broker) and our FastRedis.
    from redis import ConnectionPool

    from engine.store.endpoint import RedisAddress

    try:
        ConnectionPool.from_url(value)
        RedisAddress.parse(value)
    except (ValueError, ConfigError) as exc:
        raise ValueError(
            f"a redis://, rediss:// or unix:// URL whose options parse ({exc})"
        ) from None
    return value


def broker_url(raw: str) -> str:
    value = raw.strip()
    scheme = urlsplit(value).scheme
    if scheme in ("redis", "rediss", "unix"):
        return redis_url(value)
    if scheme not in ("amqp", "amqps"):
        raise ValueError("a redis://, rediss://, unix://, amqp:// or amqps:// URL")
    parts = urlsplit(value)
    if parts.username is not None and parts.password is None:
        # pika fails on it with a TypeError that would name nothing useful.
        raise ValueError("an amqp:// URL with both user and password (amqp://user:pass@host/vhost)")
    import pika  # Dramatiq's RabbitMQ broker parses it with pika: refuse what pika refuses

    try:
        pika.URLParameters(value)
    except Exception as exc:
        raise ValueError(f"an amqp:// or amqps:// URL whose options parse ({exc})") from None
    return value


def text(raw: str) -> str:
    return raw.strip()


def path_template(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/") or "{userId}" not in value:
        raise ValueError("a path starting with / that contains {userId}")
    return value


def optional_path(raw: str) -> str:
    value = raw.strip()
    if value and not value.startswith("/"):
        raise ValueError("empty or a path starting with /")
    return value


LOG_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "critical": "CRITICAL",
}


def log_level(raw: str) -> str:
    return LOG_LEVELS[choice(*LOG_LEVELS)(raw)]


def access_log(raw: str) -> float:
    """`on` (1.0), `off` (0.0) or `sample:<fraction>` with a fraction in (0, 1]."""
    value = raw.strip().lower()
    if value in ("on", "true", "1"):
        return 1.0
    if value in ("off", "false", "0"):
        return 0.0
    form = "on, off or sample:<fraction> with 0 < fraction <= 1 (e.g. sample:0.01)"
    if not value.startswith("sample:"):
        raise ValueError(form)
    try:
        fraction = float(value.removeprefix("sample:"))
    except ValueError:
        raise ValueError(form) from None
    if not 0 < fraction <= 1:  # also refuses nan
        raise ValueError(form)
    return fraction


PORT = int_in(1, 65535)
DB = int_in(0, 15)
MS = int_in(1, 86_400_000)

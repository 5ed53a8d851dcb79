"""Knobs of the simulated upstreams, read from a mapping of environment variables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import ConfigError

MAX_DELAY_MS = 600_000


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """Latency and failure injection for the sandbox timeline service."""

    latency_ms: int = 0
    jitter_ms: int = 0
    error_rate: float = 0.0


def _delay_ms(name: str, raw: str) -> int:
    accepted = f"an integer from 0 to {MAX_DELAY_MS}"
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {accepted}") from None
    if not 0 <= value <= MAX_DELAY_MS:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {accepted}")
    return value


def _share(name: str, raw: str) -> float:
    accepted = "a number from 0 to 1"
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {accepted}") from None
    # float() accepts "nan" and "inf", which would silently disable or saturate the knob.
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {accepted}")
    return value


def load_sandbox_settings(env: Mapping[str, str]) -> SandboxSettings:
    """Build SandboxSettings from SANDBOX_* variables; raise ConfigError on a bad value."""
    defaults = SandboxSettings()
    latency, jitter, rate = defaults.latency_ms, defaults.jitter_ms, defaults.error_rate
    # An empty value means "not set", as in engine.settings.
    if (raw := env.get("SANDBOX_LATENCY_MS", "")).strip():
        latency = _delay_ms("SANDBOX_LATENCY_MS", raw)
    if (raw := env.get("SANDBOX_JITTER_MS", "")).strip():
        jitter = _delay_ms("SANDBOX_JITTER_MS", raw)
    if (raw := env.get("SANDBOX_ERROR_RATE", "")).strip():
        rate = _share("SANDBOX_ERROR_RATE", raw)
    return SandboxSettings(latency_ms=latency, jitter_ms=jitter, error_rate=rate)

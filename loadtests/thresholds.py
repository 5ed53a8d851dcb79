"""Pass or fail a load run: the error rate and the p99 latency against their bounds.

Kept apart from the locustfile (which imports locust, and with it gevent's monkey-patching)
so that the verdict is plain arithmetic the unit tests can check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_MAX_P99_MS = 100.0


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a load run must stay under to pass."""

    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # failed requests / all requests
    max_p99_ms: float = DEFAULT_MAX_P99_MS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Bounds:
        """LOAD_MAX_ERROR_RATE (0..1) and LOAD_P99_MS (> 0); a malformed one is an error."""
        rate = _number(env, "LOAD_MAX_ERROR_RATE", DEFAULT_MAX_ERROR_RATE)
        p99 = _number(env, "LOAD_P99_MS", DEFAULT_MAX_P99_MS)
        if not 0 <= rate <= 1:
            raise ValueError(f"LOAD_MAX_ERROR_RATE={rate:g}: expected a number from 0 to 1")
        if p99 <= 0:
            raise ValueError(f"LOAD_P99_MS={p99:g}: expected a number of milliseconds over 0")
        return cls(rate, p99)


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


def verdict(requests: int, failures: int, p99_ms: float, bounds: Bounds) -> list[str]:
    """Why the run failed (empty: it passed). A run that sent nothing fails too."""
    if requests == 0:
        return ["no request was sent"]
    problems = []
    rate = failures / requests
    if rate > bounds.max_error_rate:
        problems.append(
            f"error rate {rate:.2%} ({failures}/{requests}) over {bounds.max_error_rate:.2%}"
        )
    if p99_ms > bounds.max_p99_ms:
        problems.append(f"p99 {p99_ms:g} ms over {bounds.max_p99_ms:g} ms")
    return problems

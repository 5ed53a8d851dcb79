"""A value computed at most once per interval and shared by every caller in between.

Unauthenticated endpoints that cost Redis work (the SCAN behind /health/cache) must not let
each request pay for its own: callers within `ttl_s` of the last computation get its result,
and concurrent callers of an expired memo wait for one computation together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Memo(Generic[T]):
    """The result of `compute()`, kept for `ttl_s`; one computation in flight at a time."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._value: T | None = None
        self._expires = 0.0
        self._flight: asyncio.Future[T] | None = None

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        """The kept value while fresh, else the value of one (shared) new computation."""
        if self._value is not None and time.monotonic() < self._expires:
            return self._value
        if self._flight is None:
            self._flight = asyncio.ensure_future(self._compute(compute))
            self._flight.add_done_callback(_retrieve)
        # shield: a caller that goes away must not cancel the computation others wait for.
        return await asyncio.shield(self._flight)

    async def _compute(self, compute: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await compute()
            self._value, self._expires = value, time.monotonic() + self._ttl
            return value
        finally:
            self._flight = None


def _retrieve(flight: asyncio.Future[Any]) -> None:
    # Every waiter may have gone: retrieve a failure so that asyncio does not log it.
    if not flight.cancelled():
        flight.exception()

"""Helpers for the strategy tests: virtual clocks, entries written at a chosen time, and the
batch messages a tick left on the queue (decoded as the worker would)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq

from engine import wire
from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import QUEUES
from engine.settings import Settings
from engine.store.cache import Stored, TimelineCache
from engine.store.fastredis import FastRedis
from sandbox.timeline import generate_posts

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
# Midnight UTC of the first day of the virtual weeks (Monday 2026-11-02).
DAY0 = 1_793_577_600_000


@dataclass(frozen=True)
class Queued:
    """One batch message on the queue."""

    actor: str
    users: list[str]
    origin: str
    force: bool


async def queued_batches(queue: FastRedis) -> list[Queued]:
    """Every message waiting on the priority queues, decoded."""
    out: list[Queued] = []
    for name in QUEUES.values():
        for raw in await queue.execute("HVALS", layout.messages_key(name)):
            message: dramatiq.Message[Any] = dramatiq.Message.decode(raw)
            users = message.args[0]
            out.append(
                Queued(
                    message.actor_name,
                    list(users) if isinstance(users, list) else [users],
                    message.kwargs["origin"],
                    message.kwargs["force"],
                )
            )
    return out


def queued_users(batches: list[Queued]) -> dict[str, Queued]:
    """user -> the batch that holds it."""
    return {user: batch for batch in batches for user in batch.users}


async def store_at(
    settings: Settings,
    redis: dict[str, FastRedis],
    user: str,
    tier: str,
    at_ms: int,
    origin: str | None = None,
) -> Stored:
    """Store an entry for `user` in `tier` as if written at `at_ms` (its expiry index says
    at_ms + TTL; Redis keeps it for the full TTL from now)."""
    cache = TimelineCache(settings, redis["hot"], redis["warm"], clock=lambda: at_ms)
    ticket = await cache.begin(user, tier, check_hot=False, origin=origin)
    body = wire.cached_body(generate_posts(user, 5), at_ms, tier, cached=True)
    return await cache.store(tier, user, cache.encode(body, tier), ticket)

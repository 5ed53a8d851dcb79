"""Per-shard script calls in one pipelined round trip, and users grouped by key shard.

The strategies keep one index key per key shard (engine.store.keys.SHARDS), so that a store
script can write an entry and its index member in one atomic step (one Cluster slot). A tick
therefore runs one small script per shard: issued together, they cost one round trip.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from engine.errors import RedisReplyError
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.fastredis import Arg, Script


def by_shard(users: Iterable[str]) -> dict[int, list[str]]:
    """The users grouped by their key shard."""
    groups: dict[int, list[str]] = defaultdict(list)
    for user in users:
        groups[keys.shard_of(user)].append(user)
    return groups


async def eval_many(
    redis: RedisClient, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]
) -> list[Any]:
    """Run `script` once per (keys, args) call, all in one pipeline; the replies in order.

    A server that does not know the script yet (NOSCRIPT) gets it loaded once and the calls
    that it refused repeated, and only those: another connection may load the script while
    this pipeline runs, so some calls may already have run (and scripts need not be
    idempotent). Any other error reply raises RedisReplyError.
    """
    if not calls:
        return []
    commands = [("EVALSHA", script.sha, len(k), *k, *a) for k, a in calls]
    replies = await redis.pipeline(commands)
    refused = [i for i, reply in enumerate(replies) if _noscript(reply)]
    if refused:
        await redis.execute("SCRIPT", "LOAD", script.source)
        again = await redis.pipeline([commands[i] for i in refused])
        for i, reply in zip(refused, again, strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def commands(redis: RedisClient, batch: Sequence[Sequence[Arg]]) -> list[Any]:
    """Send plain commands in one pipeline; raise the first error reply."""
    replies = await redis.pipeline(batch)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _noscript(reply: Any) -> bool:
    return isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT")

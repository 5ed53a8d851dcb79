"""The small interface that the cache tiers, the strategies and the metrics use to talk to Redis.

Two clients implement it: `FastRedis` (engine/store/fastredis.py: one auto-pipelined
connection to a single node, the fastest read path we measured) and `ClusterRedis`
(engine/store/cluster.py: valkey-glide's cluster client, which follows MOVED/ASK and splits
pipelines by node). Both return RESP2-shaped replies: bulk strings as bytes, integers as int,
arrays as lists, nil as None; an error reply raises (or, inside a pipeline, is returned as)
`RedisReplyError`, and a server out of reach raises `RedisUnavailable`.

The queue role (Dramatiq's layout, the job scripts, the scheduler lease) needs one node and
stays on `FastRedis` whatever the cache runs on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from engine.store.fastredis import Arg, Script


class RedisClient(Protocol):
    """What callers may use of a Redis client (see the module docstring)."""

    async def execute(self, *args: Arg) -> Any:
        """One command; its raw reply."""
        ...

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands in one round trip (per node); error replies in the list."""
        ...

    async def get(self, key: bytes | str) -> bytes | None:
        """GET."""
        ...

    def send_now(self, *args: Arg) -> asyncio.Future[Any] | None:
        """One command sent without waiting: its raw reply's future (an error reply as a
        value), or None when the client cannot (then `execute`)."""
        ...

    async def set(self, key: bytes | str, value: Arg, px: int | None = None) -> bool:
        """SET, with PX when given."""
        ...

    async def delete(self, *keys: bytes | str) -> int:
        """DEL."""
        ...

    async def pttl(self, key: bytes | str) -> int:
        """PTTL."""
        ...

    async def evalsha_or_eval(
        self, script: Script, keys: Sequence[bytes | str], args: Sequence[Arg]
    ) -> Any:
        """Run a script by SHA1, loading it on NOSCRIPT; every key in one slot."""
        ...

    async def close(self) -> None:
        """Close the connections; later commands raise."""
        ...

"""The cache on a Redis Cluster: valkey-glide's cluster client behind `RedisClient`.

Chosen on the read path's figures (tuning.md, "Redis clients"): on GET of a 9.6 KB entry from
64 coroutines, glide's Rust core costs about half the CPU per GET of redis-py's RedisCluster
and serves about four times its GETs per second. It discovers the topology from one seed
node, follows MOVED and ASK, refreshes its slot map on topology changes, and splits a
non-atomic batch by node (one round trip per node, replies in order): what the per-shard
script pipelines of the strategies need. On a single node FastRedis stays several times
cheaper, so it keeps that path.

Replies are made RESP2-shaped like FastRedis's (module engine.store.client) by
engine.store.cluster_replies: glide's `str` simple strings become bytes, its maps (HGETALL)
flat lists, and its error texts (`NoScriptError: ...`) the server's own (`NOSCRIPT ...`).
This module routes commands and keeps the glide client alive. A command without a key runs
where Redis Cluster clients conventionally run it: PING, DBSIZE (summed) and INFO (per node,
with `used_memory` summed in a first section) on every primary; SCAN walks the primaries one
after the other behind one composite cursor; SCRIPT LOAD on every node.

The glide client is created lazily on first use (so a process starts while the Cluster is
down) and again after glide closed it; a failed creation is not retried for
RECONNECT_HOLDOFF_S, so an outage costs each caller an immediate `RedisUnavailable`, not a
connect timeout. glide is imported only then, after fork: its Rust runtime starts threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from engine.errors import ConfigError, RedisReplyError, RedisUnavailable
from engine.store.cluster_replies import (
    Redirected,
    glide_args,
    merged_info,
    node_name,
    reply_error,
    shape,
)
from engine.store.endpoint import RedisAddress
from engine.store.fastredis import Arg, Script

RECONNECT_HOLDOFF_S = 0.5
# A redirect that glide hands back instead of following (seen while a slot migrates under
# concurrent requests: the target answers MOVED to a request whose ASKING another request's
# command consumed) means the command did not run: it is sent again after these pauses.
REDIRECT_PAUSES_S = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256)
_ALL_PRIMARIES = {b"PING", b"DBSIZE", b"INFO"}
_KEYLESS = {*_ALL_PRIMARIES, b"SCAN", b"SCRIPT"}


def _word(arg: Arg) -> bytes:
    return (arg if isinstance(arg, bytes) else str(arg).encode()).upper()


class ClusterRedis:
    """The cache's client on a Redis Cluster; see the module docstring.

    `url` names one seed node (redis:// or rediss://, with ACL user, password and the TLS
    options of engine.store.endpoint); DB numbers do not exist on a Cluster.
    """

    def __init__(self, url: str, *, connect_timeout: float = 2.0, timeout: float = 5.0) -> None:
        if connect_timeout <= 0 or timeout <= 0:
            raise ConfigError("Redis timeouts must be positive")
        self.endpoint = RedisAddress.parse(url)
        if self.endpoint.path is not None:
            raise ConfigError("a Redis Cluster needs a redis:// or rediss:// URL, not a socket")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._client: Any = None
        self._connecting: asyncio.Future[Any] | None = None
        self._retry_at = 0.0
        self._last_error = ""
        self._closed = False

    # --- the glide client's lifetime --------------------------------------------------------

    def _config(self) -> Any:
        import glide

        ep = self.endpoint
        credentials = None
        if ep.password is not None:
            credentials = glide.ServerCredentials(password=ep.password, username=ep.username)
        tls = None
        if ep.tls:
            tls = glide.TlsAdvancedConfiguration(
                use_insecure_tls=not ep.tls_options.verify,
                root_pem_cacerts=(
                    Path(ep.tls_options.ca_certs).read_bytes() if ep.tls_options.ca_certs else None
                ),
                client_cert_path=ep.tls_options.certfile,
                client_key_path=ep.tls_options.keyfile,
            )
        return glide.GlideClusterClientConfiguration(
            [glide.NodeAddress(ep.host, ep.port)],
            use_tls=ep.tls,
            credentials=credentials,
            request_timeout=round(self.timeout * 1000),
            protocol=glide.ProtocolVersion.RESP2,
            client_name="prefetch",
            advanced_config=glide.AdvancedGlideClusterClientConfiguration(
                connection_timeout=round(self.connect_timeout * 1000), tls_config=tls
            ),
        )

    async def _glide(self) -> Any:
        client = self._client
        if client is not None:
            return client
        if self._closed:
            raise RedisUnavailable("the Redis Cluster client is closed")
        loop = asyncio.get_running_loop()
        if self._connecting is None:
            if loop.time() < self._retry_at:
                raise RedisUnavailable(self._last_error)
            self._connecting = asyncio.ensure_future(self._create())
        return await asyncio.shield(self._connecting)

    async def _create(self) -> Any:
        import glide

        # glide's core logs every redirect and NOSCRIPT as a warning to stdout; our errors
        # are raised, and logged by whoever handles them.
        glide.Logger.init(glide.LogLevel.ERROR)
        loop = asyncio.get_running_loop()
        try:
            client = await asyncio.wait_for(
                glide.GlideClusterClient.create(self._config()), self.connect_timeout * 2 + 1
            )
        except (glide.GlideError, OSError, TimeoutError) as exc:
            self._retry_at = loop.time() + RECONNECT_HOLDOFF_S
            self._last_error = f"Redis Cluster at {self.endpoint} unreachable: {exc}"
            raise RedisUnavailable(self._last_error) from None
        finally:
            self._connecting = None
        if self._closed:
            await client.close()
            raise RedisUnavailable("the Redis Cluster client is closed")
        self._client = client
        return client

    async def close(self) -> None:
        """Close the client; commands in flight fail and later ones raise."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> ClusterRedis:
        await self._glide()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _failure(self, exc: BaseException, client: Any) -> Exception:
        """The error of ours for a glide exception (dropping a client glide has closed)."""
        import glide

        if isinstance(exc, glide.ClosingError):
            if self._client is client:
                self._client = None
            return RedisUnavailable(f"Redis Cluster at {self.endpoint}: {exc}")
        if isinstance(exc, glide.TimeoutError | glide.ConnectionError):
            return RedisUnavailable(f"Redis Cluster at {self.endpoint}: {exc}")
        if isinstance(exc, glide.RequestError):
            return reply_error(str(exc))
        return RedisUnavailable(f"Redis Cluster at {self.endpoint}: {exc!r}")

    async def _call(self, args: Sequence[Arg], route: Any = None) -> Any:
        import glide

        command = glide_args(args)
        for pause in (*REDIRECT_PAUSES_S, None):
            client = await self._glide()
            try:
                if route is None:
                    return await client.custom_command(command)
                return await client.custom_command(command, route)
            except glide.GlideError as exc:
                failure = self._failure(exc, client)
                if pause is None or not isinstance(failure, Redirected):
                    raise failure from None
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    # --- RedisClient ------------------------------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        """One command, routed by its key (see the module docstring for keyless ones)."""
        if not args:
            raise ValueError("empty Redis command")
        name = _word(args[0])
        if name in _ALL_PRIMARIES:
            return await self._on_primaries(name, args)
        if name == b"SCAN":
            return await self._scan(args)
        if name == b"SCRIPT" and len(args) > 1 and _word(args[1]) == b"LOAD":
            import glide

            replies = await self._call(args, glide.AllNodes())
            return shape(next(iter(replies.values())) if isinstance(replies, dict) else replies)
        return shape(await self._call(args))

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send `commands` in one batch: glide groups them by node (one round trip per node)
        and puts the replies back in order; error replies come back as RedisReplyError.

        Keyless commands (PING, DBSIZE, INFO, SCAN, SCRIPT) run beside the batch, as
        `execute` runs them."""
        if not commands:
            return []
        if any(not command for command in commands):
            raise ValueError("empty Redis command")
        special = [i for i, c in enumerate(commands) if _word(c[0]) in _KEYLESS]
        if special:
            return await self._mixed(commands, special)
        return await self._batch(commands)

    async def _mixed(self, commands: Sequence[Sequence[Arg]], special: list[int]) -> list[Any]:
        keyed = [c for i, c in enumerate(commands) if i not in set(special)]

        async def one(command: Sequence[Arg]) -> Any:
            try:
                return await self.execute(*command)
            except RedisReplyError as exc:
                return exc

        alone = await asyncio.gather(*(one(commands[i]) for i in special))
        batched = iter(await self._batch(keyed) if keyed else [])
        by_index = dict(zip(special, alone, strict=True))
        return [by_index[i] if i in by_index else next(batched) for i in range(len(commands))]

    async def _batch(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """The batch; the commands that came back redirected are sent again, alone (they did
        not run), up to len(REDIRECT_PAUSES_S) times."""
        out = await self._batch_once(commands)
        for pause in REDIRECT_PAUSES_S:
            again = [i for i, reply in enumerate(out) if isinstance(reply, Redirected)]
            if not again:
                break
            await asyncio.sleep(pause)
            for i, reply in zip(
                again, await self._batch_once([commands[i] for i in again]), strict=True
            ):
                out[i] = reply
        return out

    async def _batch_once(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        import glide

        batch = glide.ClusterBatch(is_atomic=False)
        for command in commands:
            batch.custom_command(glide_args(command))
        client = await self._glide()
        try:
            replies = await client.exec(batch, raise_on_error=False)
        except glide.GlideError as exc:
            raise self._failure(exc, client) from None
        out: list[Any] = []
        for reply in replies or []:
            if isinstance(reply, glide.RequestError):
                out.append(reply_error(str(reply)))
            else:
                out.append(shape(reply))
        return out

    def send_now(self, *args: Arg) -> asyncio.Future[Any] | None:
        """None: a command here needs its slot's node, found by `execute`."""
        return None

    async def get(self, key: bytes | str) -> bytes | None:
        """GET: the value, or None if the key does not exist."""
        return cast("bytes | None", await self._call((b"GET", key)))

    async def set(self, key: bytes | str, value: Arg, px: int | None = None) -> bool:
        """SET, with an expiry in milliseconds if `px` is given; True when Redis said OK."""
        expiry: tuple[Arg, ...] = () if px is None else (b"PX", px)
        return bool(shape(await self._call((b"SET", key, value, *expiry))) == b"OK")

    async def delete(self, *keys: bytes | str) -> int:
        """DEL (glide splits keys of several slots by node)."""
        if not keys:
            return 0
        return cast(int, await self._call((b"DEL", *keys)))

    async def pttl(self, key: bytes | str) -> int:
        """PTTL: milliseconds to live, -1 without expiry, -2 if the key does not exist."""
        return cast(int, await self._call((b"PTTL", key)))

    async def evalsha_or_eval(
        self, script: Script, keys: Sequence[bytes | str], args: Sequence[Arg]
    ) -> Any:
        """Run `script` by SHA1 on the node of its keys' slot, EVAL on NOSCRIPT (a node
        promoted by a failover may not have it yet)."""
        try:
            return await self.execute(b"EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute(b"EVAL", script.source, len(keys), *keys, *args)

    # --- keyless commands ---------------------------------------------------------------------

    async def primaries(self) -> list[str]:
        """`host:port` of every primary, sorted (as glide sees the topology now)."""
        import glide

        # ECHO has no reply aggregation policy: glide answers with one reply per primary.
        replies = await self._call((b"ECHO", b"primaries"), glide.AllPrimaries())
        if not isinstance(replies, dict):
            return [f"{self.endpoint.host}:{self.endpoint.port}"]
        return sorted(node_name(node) for node in replies)

    async def _on_primaries(self, name: bytes, args: Sequence[Arg]) -> Any:
        import glide

        replies = await self._call(args, glide.AllPrimaries())
        if not isinstance(replies, dict):  # aggregated by glide (PING: all said PONG; DBSIZE)
            return shape(replies)
        by_node = {node_name(node): shape(reply) for node, reply in sorted(replies.items())}
        if name == b"PING":
            return b"PONG"
        if name == b"DBSIZE":
            return sum(int(v) for v in by_node.values())
        return merged_info(by_node)

    async def _scan(self, args: Sequence[Arg]) -> list[Any]:
        """SCAN over every primary in turn; the cursor is `<primary index>-<node cursor>`."""
        import glide

        cursor = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
        index, _, node_cursor = cursor.partition("-") if "-" in cursor else ("0", "", cursor)
        nodes = await self.primaries()
        i = int(index)
        if i >= len(nodes):
            return [b"0", []]
        host, _, port = nodes[i].rpartition(":")
        reply = await self._call(
            (b"SCAN", node_cursor, *args[2:]), glide.ByAddressRoute(host, int(port))
        )
        following, found = shape(reply)
        if following != b"0":
            return [f"{i}-{following.decode()}".encode(), found]
        if i + 1 < len(nodes):
            return [f"{i + 1}-0".encode(), found]
        return [b"0", found]

"""A lean asyncio Redis client on hiredis's reader that pipelines on its own.

All commands issued by any coroutines during one event-loop iteration go out in one
`transport.write`; replies are matched to callers FIFO. Per command this costs a fraction of
redis-py's CPU. A lost connection fails every command in flight with `RedisUnavailable`; the
next command reconnects (bounded by `connect_timeout`). When a reconnect fails, the next ones
are made with backoff, in the background: meanwhile every command fails at once instead of
waiting out a connect timeout behind a dead or blackholed host. A command without a reply
within `timeout` fails with `RedisUnavailable` and drops the connection (FIFO matching can
no longer be trusted). An error reply raises `RedisReplyError`, or `RedisRefused` when Redis
says "not now" (OOM, LOADING, READONLY, ...; see engine.errors). Replies are RESP2, undecoded
(bytes); do not use SUBSCRIBE, MONITOR, HELLO 3 or CLIENT REPLY, which break
one-reply-per-command.

TLS (`rediss://`) honours the query options redis-py honours: `ssl_cert_reqs`
(none|optional|required), `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` and
`ssl_check_hostname`.

The socket itself (buffering, the one write per iteration, FIFO matching, deadlines) is
engine.store.connection's `Connection`; this module is the client around it: packing
commands, dialling and reconnecting with backoff, turning error replies into exceptions.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Self, TypeAlias, cast

import hiredis

from engine import tracing
from engine.errors import (
    ConfigError,
    RedisRefused,
    RedisReplyError,
    RedisUnavailable,
    redis_reply_error,
)
from engine.store.connection import Connection, ConnectionStats
from engine.store.endpoint import RedisAddress

Arg: TypeAlias = bytes | str | int | float
"""A command argument, as hiredis packs it (ints and floats are sent in decimal)."""

# Reconnect backoff after a failed dial: doubles from the first to the last, with jitter so
# that the processes of a pod do not dial in step.
RECONNECT_FIRST_S: Final = 0.05
RECONNECT_MAX_S: Final = 2.0
# hiredis >= 2.1 packs commands in C; its stub types the argument as a 1-tuple.
_pack = cast("Callable[[tuple[Arg, ...]], bytes]", hiredis.pack_command)


def _pack_checked(args: Sequence[Arg]) -> bytes:
    if not args:  # Redis would not answer it, shifting every later reply
        raise ValueError("empty Redis command")
    return _pack(tuple(args))


class Script:
    """A Lua script with its SHA1, computed locally, for `FastRedis.evalsha_or_eval`."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    @classmethod
    def load(cls, module_file: str, name: str, *more: str) -> Script:
        """The script in the `.lua` file `name` beside the module `module_file` (its __file__).

        With `more`, those files follow it, each on a new line: Redis scripts cannot
        `require`, so a script shares Lua with another by having the same fragment prepended.
        """
        folder = Path(module_file).parent
        return cls("\n".join((folder / n).read_text(encoding="utf-8") for n in (name, *more)))


def _still_down(cause: BaseException | None) -> RedisUnavailable:
    """The error of a command refused while the client waits to reconnect: like the last."""
    if isinstance(cause, RedisRefused):
        return RedisRefused(f"reconnecting; Redis last said: {cause}", cause.kind)
    return RedisUnavailable(f"Redis unavailable, reconnecting: {cause}")


def _silence(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel or retrieve `futures` so that none logs 'exception was never retrieved'."""
    for fut in futures:
        if not fut.cancel() and not fut.cancelled():  # done with a result or an exception
            fut.exception()


async def _replies(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """The replies of a pipeline, error replies as RedisReplyError (or RedisRefused)."""
    results: list[Any] = []
    try:
        for fut in futures:
            reply = await fut
            if isinstance(reply, RedisReplyError):
                reply = redis_reply_error(reply)
            results.append(reply)
    except BaseException:
        _silence(futures)
        raise
    return results


class FastRedis:
    """An auto-pipelining Redis client on one connection; see the module docstring.

    `FastRedis(url)` connects lazily on the first command; `await FastRedis.connect(url)`
    connects (and authenticates) up front. Bound to the event loop it first connects on.
    """

    def __init__(
        self, url: str, db: int = 0, *, connect_timeout: float = 2.0, timeout: float | None = 5.0
    ) -> None:
        if connect_timeout <= 0 or (timeout is not None and timeout <= 0):
            raise ConfigError("Redis timeouts must be positive")
        self.address = RedisAddress.parse(url, db)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._stats = ConnectionStats()
        self._conn: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None
        self._closed = False
        self._tls: ssl.SSLContext | None = None
        # Dials that failed in a row, when the next may start (loop time), and why it failed.
        self._failures = 0
        self._retry_at = 0.0
        self._down: BaseException | None = None

    @classmethod
    async def connect(
        cls, url: str, db: int = 0, *, connect_timeout: float = 2.0, timeout: float | None = 5.0
    ) -> FastRedis:
        """Connect to `url`, AUTH and SELECT; raise `RedisUnavailable` if that fails."""
        client = cls(url, db, connect_timeout=connect_timeout, timeout=timeout)
        await client._connection()
        return client

    @property
    def is_connected(self) -> bool:
        """Whether a connection is open right now (the next command may still reconnect)."""
        return self._conn is not None and not self._conn.closed

    def on_disconnect(self, listener: Callable[[], None]) -> None:
        """Call `listener` (synchronously) whenever a connection of this client closes: the
        state Redis kept for it (CLIENT TRACKING, ...) is gone; the next one starts bare."""
        self._stats.listeners.append(listener)

    @property
    def writes(self) -> int:
        """How many socket writes this client made (one per loop iteration with commands)."""
        return self._stats.writes

    @property
    def in_flight(self) -> int:
        """How many commands await a reply."""
        return self._conn.in_flight if self._conn is not None else 0

    @property
    def reconnecting(self) -> bool:
        """Whether the last dial failed, so that commands fail at once until one succeeds."""
        return self._failures > 0

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise RedisUnavailable("Redis client is closed")
        task = self._connecting
        if self._failures:
            # The last dial failed: dial again in the background once the backoff is over,
            # and fail now rather than hold every caller for a connect timeout.
            loop = asyncio.get_running_loop()
            if task is None and loop.time() >= self._retry_at:
                self._dial_in_background(loop)
            raise _still_down(self._down)
        if task is None:
            task = self._dial_in_background(asyncio.get_running_loop())
        try:
            return await asyncio.shield(task)
        except RedisRefused as exc:  # shared by every caller: give each its own
            raise RedisRefused(str(exc), exc.kind) from exc.__cause__
        except RedisUnavailable as exc:
            raise RedisUnavailable(str(exc)) from exc.__cause__
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise RedisUnavailable("Redis client closed while connecting") from None
            raise

    def _dial_in_background(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[Connection]:
        task = loop.create_task(self._open())
        task.add_done_callback(self._opened)
        self._connecting = task
        return task

    def _opened(self, task: asyncio.Task[Connection]) -> None:
        self._connecting = None
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self._failures = 0
            self._conn = task.result()
            if self._closed:  # close() raced with a successful connect
                self._conn.fail("Redis client closed")
            return
        self._failures += 1
        self._down = error
        backoff = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (self._failures - 1))
        self._retry_at = task.get_loop().time() + backoff * random.uniform(0.8, 1.2)

    async def _open(self) -> Connection:
        try:
            return await asyncio.wait_for(self._dial(), self.connect_timeout)
        except RedisUnavailable:
            raise
        except OSError as exc:  # TimeoutError too
            raise RedisUnavailable(f"cannot connect to Redis at {self.address}: {exc!r}") from exc

    async def _dial(self) -> Connection:
        loop = asyncio.get_running_loop()
        addr = self.address
        conn = Connection(loop, self.timeout, self._stats)
        if addr.path is not None:
            await loop.create_unix_connection(lambda: conn, addr.path)
        else:
            tls, host = (self._tls_context(), addr.host) if addr.tls else (None, None)
            await loop.create_connection(
                lambda: conn, addr.host, addr.port, ssl=tls, server_hostname=host
            )
        try:
            setup: list[tuple[Arg, ...]] = []
            if addr.password is not None and addr.username:
                setup.append((b"AUTH", addr.username, addr.password))
            elif addr.password is not None:
                setup.append((b"AUTH", addr.password))
            if addr.db:
                setup.append((b"SELECT", addr.db))
            futures = [conn.send(_pack(command)) for command in setup]
            for fut in futures:
                if isinstance(reply := await fut, RedisReplyError):
                    _silence(futures)
                    refused = redis_reply_error(reply)
                    if isinstance(refused, RedisRefused):  # LOADING, BUSY: not a bad password
                        raise refused
                    raise RedisUnavailable(f"Redis refused AUTH/SELECT at {addr}: {reply}")
        except BaseException:
            await conn.close()
            raise
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        # Built once: loading CA files per dial would cost a disk read each reconnect.
        if self._tls is None:
            self._tls = self.address.tls_options.context()
        return self._tls

    async def close(self) -> None:
        """Close the connection; commands in flight fail and later ones raise."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Self:
        await self._connection()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its raw reply; an error reply raises RedisReplyError."""
        payload = _pack_checked(args)
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        if tracing.tracer is not None:  # off: this one test is all tracing costs here
            return await self._traced(conn.send(payload), args)
        reply = await conn.send(payload)
        if isinstance(reply, RedisReplyError):
            raise redis_reply_error(reply)
        return reply

    def send_now(self, *args: Arg) -> asyncio.Future[Any] | None:
        """Send one command on the live connection without waiting: the future of its raw
        reply (an error reply as a RedisReplyError value, not raised). None when there is no
        live connection or tracing is on: `execute` is the way then."""
        conn = self._conn
        if conn is None or conn.closed or tracing.tracer is not None:
            return None
        return conn.send(_pack_checked(args))

    async def _traced(self, reply_future: asyncio.Future[Any], args: Sequence[Arg]) -> Any:
        with tracing.redis_span((args,), self.address.db):
            reply = await reply_future
            if isinstance(reply, RedisReplyError):
                raise redis_reply_error(reply)
            return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send `commands` at once; error replies are returned in the list, as RedisReplyError
        (RedisRefused for refusals). Connection failures and timeouts raise `RedisUnavailable`.
        """
        payloads = [_pack_checked(command) for command in commands]
        if not payloads:
            return []
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        futures = [conn.send(payload) for payload in payloads]
        if tracing.tracer is not None:
            with tracing.redis_span(commands, self.address.db):
                return await _replies(futures)
        return await _replies(futures)

    async def get(self, key: bytes | str) -> bytes | None:
        """GET: the value, or None if the key does not exist."""
        return cast("bytes | None", await self.execute(b"GET", key))

    async def set(self, key: bytes | str, value: Arg, px: int | None = None) -> bool:
        """SET, with an expiry in milliseconds if `px` is given; True when Redis said OK."""
        expiry: tuple[Arg, ...] = () if px is None else (b"PX", px)
        return bool(await self.execute(b"SET", key, value, *expiry) == b"OK")

    async def delete(self, *keys: bytes | str) -> int:
        """DEL: how many of `keys` existed."""
        if not keys:
            return 0
        return cast(int, await self.execute(b"DEL", *keys))

    async def pttl(self, key: bytes | str) -> int:
        """PTTL: milliseconds to live, -1 without expiry, -2 if the key does not exist."""
        return cast(int, await self.execute(b"PTTL", key))

    async def evalsha_or_eval(
        self, script: Script, keys: Sequence[bytes | str], args: Sequence[Arg]
    ) -> Any:
        """Run `script` by its SHA1, falling back to EVAL (which caches it) on NOSCRIPT."""
        try:
            return await self.execute(b"EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute(b"EVAL", script.source, len(keys), *keys, *args)

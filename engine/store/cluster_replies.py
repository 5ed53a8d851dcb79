"""glide's replies and errors made FastRedis's, so that callers cannot tell the clients apart.

Apart from engine.store.cluster because this is translation, not a client: pure functions of
the values glide hands back, with no glide import and no Cluster needed to reason about them.
glide's `str` simple strings become bytes, its maps (HGETALL) flat lists, its sets lists;
its error texts (`NoScriptError: ...`) become the server's own (`NOSCRIPT ...`), and an error
that only says the Cluster is changing becomes a `Redirected`, which the client sends again.
The INFO of every primary is merged into one reply with the Cluster's `used_memory` up front,
where the health view reads a single node's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from engine.errors import RedisReplyError, RedisUnavailable
from engine.store.fastredis import Arg

# glide's rendering of a server error: "An error was signalled by the server: - Kind: text".
_SERVER_ERROR = re.compile(r"^(?:An error was signalled by the server: - )?(\w+): ?(.*)$", re.S)
# redis-rs's names for the error codes it knows (the rest keep the server's own code).
_KINDS = {
    "ResponseError": "ERR",
    "NoScriptError": "NOSCRIPT",
    "BusyLoadingError": "LOADING",
    "ClusterDown": "CLUSTERDOWN",
    "CrossSlot": "CROSSSLOT",
    "MasterDown": "MASTERDOWN",
    "ReadOnly": "READONLY",
    "TryAgain": "TRYAGAIN",
    "ExecAbortError": "EXECABORT",
    "NotBusy": "NOTBUSY",
    "PermissionDenied": "NOPERM",
    "Moved": "MOVED",
    "Ask": "ASK",
}
_TRANSIENT = {"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"}


def server_message(text: str) -> str:
    """The error reply as the server wrote it (`NOSCRIPT No matching script...`)."""
    match = _SERVER_ERROR.match(text.strip())
    if match is None:
        return text
    kind, rest = match.groups()
    code = _KINDS.get(kind, kind)
    return f"{code} {rest}" if code.isupper() else text


class Redirected(RedisUnavailable):
    """An error reply by which the Cluster refused a command without running it."""


def reply_error(text: str) -> RedisReplyError | RedisUnavailable:
    """An error reply; one that says the Cluster is changing (a redirect glide gave up on, a
    slot mid-migration, no quorum) is `RedisUnavailable`: try again, nothing is wrong."""
    message = server_message(text)
    if message.split(" ", 1)[0] in _TRANSIENT:
        return Redirected(f"Redis Cluster is changing: {message}")
    return RedisReplyError(message)


def glide_args(args: Sequence[Arg]) -> list[str | bytes]:
    """A command's arguments as glide's custom_command takes them."""
    return [a if isinstance(a, bytes | str) else str(a) for a in args]


def shape(reply: Any) -> Any:
    """A glide reply in FastRedis's RESP2 shapes (see the module docstring)."""
    if isinstance(reply, bytes | int | float) or reply is None:
        return reply
    if isinstance(reply, str):
        return reply.encode()
    if isinstance(reply, list):
        return [shape(item) for item in reply]
    if isinstance(reply, dict):
        flat: list[Any] = []
        for key, value in reply.items():
            flat += (shape(key), shape(value))
        return flat
    if isinstance(reply, set):
        return [shape(item) for item in reply]
    return reply


def node_name(value: Any) -> str:
    """A node's `host:port` as glide keys its per-node replies (str or bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def merged_info(by_node: dict[str, bytes]) -> bytes:
    """One INFO reply for the Cluster: its primaries and summed `used_memory` in a first
    section, then each node's INFO under a `# Node host:port` header."""
    used = sum(_info_field(text, b"used_memory") for text in by_node.values())
    head = f"# Cluster\r\nprimaries:{len(by_node)}\r\nused_memory:{used}\r\n"
    head += f"used_memory_human:{_human(used)}\r\n"
    parts = [head.encode()]
    parts += [f"# Node {node}\r\n".encode() + text for node, text in by_node.items()]
    return b"\r\n".join(parts)


def _info_field(text: bytes, name: bytes) -> int:
    for line in text.splitlines():
        if line.startswith(name + b":"):
            try:
                return int(line.split(b":", 1)[1])
            except ValueError:
                return 0
    return 0


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024:
            return f"{value:.2f}{unit}" if unit != "B" else f"{size}B"
        value /= 1024
    return f"{value:.2f}T"

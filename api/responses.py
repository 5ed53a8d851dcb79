"""The one place that turns Python values into JSON responses.

msgspec encodes dicts, lists, dataclasses and Structs alike, so views hand over what the
engine returns without converting it first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

JSON = "application/json"

_encoder = msgspec.json.Encoder()


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response of `data` (already shaped as the wire wants it)."""
    return web.Response(body=_encoder.encode(data), status=status, content_type=JSON)


def success(data: Any, status: int = 200, message: str | None = None) -> web.Response:
    """The success envelope: {"success": true, ["message": ...,] "data": ...}."""
    if message is None:
        return json_response({"success": True, "data": data}, status)
    return json_response({"success": True, "message": message, "data": data}, status)


def json_body_bytes(code: str, message: str) -> bytes:
    """The encoded error envelope: {"success": false, "error": CODE, "message": text}."""
    return _encoder.encode({"success": False, "error": code, "message": message})


def error_response(status: int, code: str, message: str) -> web.Response:
    """The error envelope as a response."""
    return web.Response(body=json_body_bytes(code, message), status=status, content_type=JSON)


def iso_now() -> str:
    """Now as ISO-8601 UTC with milliseconds, the seed's `timestamp` format."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

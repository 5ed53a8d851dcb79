"""Input validation at the edge: path parameters, query values and JSON bodies.

Every check raises `BadRequest` with the contract's error code (api/openapi.yaml), so views
stay a list of calls.
The UUID check is on the read path, hence a precompiled pattern behind a length test.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from datetime import date
from typing import Any, Final

import orjson
from aiohttp import web

from api.appkeys import ERROR_LOG, REQUEST_ID, SETTINGS
from engine.errors import BadRequest, RequestTimeout, UnsupportedEncoding
from engine.settings import PRIORITIES

MAX_DELAY_MS = 86_400_000
MAX_LIMIT = 50
DEFAULT_LIMIT = 10
MAX_USER_IDS = 1000
MAX_BODY_BYTES: Final = 64 * 1024
# zlib window bits by Content-Encoding (the server leaves bodies compressed: see api.server).
_DECODERS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}

UUID_LENGTH = 36
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LIMIT = re.compile(r"\d{1,3}")


def user_id(raw: object) -> str:
    """A UUID of any version in any case, lowercased (keys are built from the lowercase form)."""
    if isinstance(raw, str) and len(raw) == UUID_LENGTH and _UUID.fullmatch(raw):
        return raw.lower()
    raise BadRequest("userId must be a UUID", code="INVALID_UUID")


def user_ids(raw: object, field: str) -> list[str]:
    """A list of 1..1000 UUIDs; a bad list is INVALID_BODY, a bad entry INVALID_UUID."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_USER_IDS:
        raise BadRequest(
            f"{field} must be a list of 1 to {MAX_USER_IDS} user ids", code="INVALID_BODY"
        )
    return [user_id(item) for item in raw]


def priority(raw: object) -> str:
    """`high|medium|low`; absent (or null) means `medium`."""
    if raw is None:
        return "medium"
    if isinstance(raw, str) and raw in PRIORITIES:
        return raw
    raise BadRequest("priority must be one of high, medium, low", code="INVALID_PRIORITY")


def delay(raw: object) -> int:
    """Milliseconds, an integer from 0 to 86,400,000; absent (or null) means 0."""
    if raw is None:
        return 0
    # JSON (and JSON Schema) has one number type: 5.0 is the integer 5, and clients that
    # encode every number as a double send it so. bool is a subclass of int, and "5" is text.
    if type(raw) is float and raw.is_integer():
        raw = int(raw)
    if type(raw) is int and 0 <= raw <= MAX_DELAY_MS:
        return raw
    raise BadRequest(
        f"delay must be an integer of milliseconds from 0 to {MAX_DELAY_MS}", code="INVALID_DELAY"
    )


def limit(raw: str | None) -> int:
    """The `limit` query value: 1..50, default 10."""
    if raw is None:
        return DEFAULT_LIMIT
    if _LIMIT.fullmatch(raw) and 1 <= int(raw) <= MAX_LIMIT:
        return int(raw)
    raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", code="INVALID_LIMIT")


def day(raw: str) -> str:
    """A real calendar date written `YYYY-MM-DD`."""
    # fromisoformat alone would also take "20241221" and week dates.
    if _DATE.fullmatch(raw):
        try:
            date.fromisoformat(raw)
        except ValueError:
            pass
        else:
            return raw
    raise BadRequest("date must be a real date written YYYY-MM-DD", code="INVALID_DATE")


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The request body, decompressed, within `timeout_s`; at most 64 KB either way.

    A body that does not arrive in time is 408 REQUEST_TIMEOUT; one cut short or mangled on
    the wire (a bad chunk, a truncated or invalid gzip stream) INVALID_BODY; an encoding other
    than gzip or deflate 415 UNSUPPORTED_ENCODING. Over 64 KB, compressed or not, aiohttp's
    HTTPRequestEntityTooLarge (413, mapped by the error middleware).
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "") and encoding not in _DECODERS:
        raise UnsupportedEncoding(
            "Content-Encoding must be gzip, deflate or identity", code="UNSUPPORTED_ENCODING"
        )
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        request.app[ERROR_LOG].warning(
            "body-timeout",
            "request %s %s %s: body not received within %.1f s",
            request.get(REQUEST_ID, "-"),
            request.method,
            request.path,
            timeout_s,
        )
        raise RequestTimeout("Request body not received in time") from None
    except (web.RequestPayloadError, ConnectionError):
        raise BadRequest("Request body is malformed or incomplete", code="INVALID_BODY") from None
    if encoding in _DECODERS and raw:
        raw = _inflate(raw, _DECODERS[encoding])
    return raw


def _inflate(data: bytes, wbits: int) -> bytes:
    # deflate (wbits 0) takes the zlib header's own window; HTTP's "deflate" means zlib.
    decoder = zlib.decompressobj(wbits=wbits or zlib.MAX_WBITS)
    try:
        plain = decoder.decompress(data, MAX_BODY_BYTES + 1)
    except zlib.error:
        raise BadRequest("Request body is not valid compressed data", code="INVALID_BODY") from None
    if len(plain) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(plain))
    if not decoder.eof or decoder.unused_data:
        raise BadRequest("Request body is truncated compressed data", code="INVALID_BODY")
    return plain


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, read within API_BODY_TIMEOUT (see read_body); an empty body
    is `{}`. Malformed JSON is INVALID_JSON; valid JSON that is no object, INVALID_BODY.
    """
    raw = await read_body(request, request.app[SETTINGS].api_body_timeout_ms / 1000)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON", code="INVALID_JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="INVALID_BODY")
    return body

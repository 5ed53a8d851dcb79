"""Input validation at the edge: path parameters, query values and JSON bodies.

Every check raises `BadRequest` with the SPEC's error code, so views stay a list of calls.
The UUID check is on the read path, hence a precompiled pattern behind a length test.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

import orjson
from aiohttp import web

from engine.errors import BadRequest
from engine.settings import PRIORITIES

MAX_DELAY_MS = 86_400_000
MAX_LIMIT = 50
DEFAULT_LIMIT = 10
MAX_USER_IDS = 1000

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LIMIT = re.compile(r"\d{1,3}")


def user_id(raw: object) -> str:
    """A UUID of any version in any case, lowercased (keys are built from the lowercase form)."""
    if isinstance(raw, str) and len(raw) == 36 and _UUID.fullmatch(raw):
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
    # bool is a subclass of int, and "5" or 5.0 are not integers on the wire either.
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


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is `{}`.

    Over client_max_size aiohttp raises HTTPRequestEntityTooLarge (413, mapped by the error
    middleware); malformed JSON is INVALID_JSON; valid JSON that is no object, INVALID_BODY.
    """
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON", code="INVALID_JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="INVALID_BODY")
    return body

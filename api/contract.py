"""The API's contract, `api/openapi.yaml`, and the route that serves it: GET /openapi.json.

The document is hand-written and reviewed like code; the test suite validates every response
it provokes against it, and CI fuzzes the running service with it (tests/fuzz_api.py). It is
read and encoded once per process, so serving it costs what a cached read does.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import yaml
from aiohttp import web

from api.responses import JSON

PATH = Path(__file__).with_name("openapi.yaml")


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document as a dict."""
    with PATH.open(encoding="utf-8") as source:
        loaded: dict[str, Any] = yaml.safe_load(source)
    return loaded


@cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: the contract (no auth)."""
    return web.Response(body=_encoded(), content_type=JSON)


ROUTES = [web.get("/openapi.json", openapi_json)]

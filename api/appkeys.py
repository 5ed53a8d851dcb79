"""Typed keys for what the app and its requests carry, in one place (no string keys).

The values behind RUNTIME, AUTH and ACTIVITY exist only while the app runs: each is set by
its cleanup context in api.app, after the process forked and the loop started.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.activity import ActivityBatcher
from api.auth import Authenticator
from api.memo import Memo
from engine.metrics.scrape import Scraper
from engine.runtime import Runtime
from engine.settings import Settings
from engine.throttle import LogThrottle

SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
AUTH = web.AppKey("auth", Authenticator)
ACTIVITY = web.AppKey("activity", ActivityBatcher)
STARTED_AT = web.AppKey("started_at", float)  # time.monotonic() when the app was built
ERROR_LOG = web.AppKey("error_log", LogThrottle)  # dependency failures, one line per code
SCRAPER = web.AppKey("scraper", Scraper)  # GET /metrics, read off the event loop
# /health/cache's last answer (body, status), kept a few seconds: it costs SCANs.
CACHE_COUNTS = web.AppKey("cache_counts", Memo[tuple[dict[str, Any], int]])

REQUEST_ID = web.RequestKey("request_id", str)
# time.perf_counter() when the app took the request: the access log's duration (uvloop's
# loop.time(), which aiohttp measures with, moves in whole milliseconds).
REQUEST_STARTED = web.RequestKey("request_started", float)
# GET /api/cache/{userId}: "hit" or "miss", for the request duration metric's `cache` label.
READ_RESULT = web.RequestKey("read_result", str)
# The route's template for a request api.front_door answered before the router (which
# leaves no match_info to read it from).
ROUTE = web.RequestKey("route", str)

"""The simulated certificate authority: token validation and service-token issuance."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

SERVICE_TOKEN = "sandbox-service"
READONLY_TOKEN = "sandbox-readonly"
EXPIRED_TOKEN = "sandbox-expired"
REVOKED_TOKEN = "sandbox-revoked"
USER_TOKEN_PREFIX = "sandbox-user-"
ISSUED_TOKEN_PREFIX = "sandbox-svc-"
TOKEN_TTL_MS = 3_600_000

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_ALL = {"read": True, "write": True, "append": True, "delete": True, "update": True}
_READ_ONLY = {"read": True, "write": False, "append": False, "delete": False, "update": False}
_USER = {"read": True, "write": True, "append": False, "delete": True, "update": False}
_JSON = "application/json"


def user_token(user_id: str) -> str:
    """The sandbox user token that the CA accepts for this user id."""
    return USER_TOKEN_PREFIX + user_id


def _refusal(code: str, message: str) -> bytes:
    return orjson.dumps(
        {"success": False, "valid": False, "error": code, "message": message, "reason": message}
    )


# The fixed answers never change, so they are encoded once.
_SERVICE_BODY = orjson.dumps(
    {
        "success": True,
        "valid": True,
        "token": {"id": SERVICE_TOKEN, "expiresAt": None, "expiryType": "persistent"},
        "permissions": _ALL,
    }
)
_READONLY_BODY = orjson.dumps(
    {
        "success": True,
        "valid": True,
        "token": {"id": READONLY_TOKEN, "expiresAt": None, "expiryType": "persistent"},
        "permissions": _READ_ONLY,
    }
)
_EXPIRED_BODY = _refusal("TOKEN_EXPIRED", "Token has expired")
_REVOKED_BODY = _refusal("TOKEN_REVOKED", "Token has been revoked")
_INVALID_BODY = _refusal("INVALID_TOKEN", "Invalid token")


class SandboxTokens:
    """Service tokens issued by the sandbox CA, and the CA's call counters."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, ttl_ms: int = TOKEN_TTL_MS
    ) -> None:
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._serial = 0
        self._current: dict[str, int] = {}  # token -> expiresAt (epoch ms)
        self._revoked: set[str] = set()
        self.validate_calls = 0
        self.by_token: dict[str, int] = {}
        self.issued = 0

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def issue(self) -> tuple[str, int]:
        """Issue a new service token; return it with its expiry in epoch ms."""
        now = self.now_ms()
        # Expired tokens are dropped here so a client that asks in a loop cannot grow memory.
        self._current = {t: exp for t, exp in self._current.items() if exp > now}
        self._serial += 1
        self.issued += 1
        token = f"{ISSUED_TOKEN_PREFIX}{self._serial}"
        self._current[token] = now + self._ttl_ms
        return token, now + self._ttl_ms

    def rotate(self) -> int:
        """Revoke every issued token (not `sandbox-service`); return how many were current."""
        count = len(self._current)
        self._revoked.update(self._current)
        self._current.clear()
        return count

    def issued_expiry(self, token: str) -> int | None:
        """The expiry of an issued token that is still current, else None."""
        expires_at = self._current.get(token)
        if expires_at is None or expires_at <= self.now_ms():
            return None
        return expires_at

    def lapsed_code(self, token: str) -> str | None:
        """Why an issued token that is no longer current fails; None if never issued."""
        if token in self._revoked:
            return "TOKEN_REVOKED"
        serial = token.removeprefix(ISSUED_TOKEN_PREFIX)
        if not (token.startswith(ISSUED_TOKEN_PREFIX) and serial.isdigit()):
            return None
        # Serials are sequential, so an issued token neither current nor revoked has expired.
        if serial == str(int(serial)) and 1 <= int(serial) <= self._serial:
            return "TOKEN_EXPIRED"
        return None

    def service_token_ok(self, token: str) -> bool:
        """Whether the timeline service should accept this bearer token."""
        return token == SERVICE_TOKEN or self.issued_expiry(token) is not None

    def count_validate(self, token: str | None) -> None:
        self.validate_calls += 1
        if token is not None:
            self.by_token[token] = self.by_token.get(token, 0) + 1

    def reset_counters(self) -> None:
        """Zero the counters; issued tokens stay valid (serials keep increasing)."""
        self.validate_calls = 0
        self.by_token = {}
        self.issued = 0

    def stats(self) -> dict[str, Any]:
        return {
            "validateCalls": self.validate_calls,
            "byToken": dict(self.by_token),
            "issued": self.issued,
        }


def validate(tokens: SandboxTokens, token: str) -> tuple[int, bytes]:
    """The CA's status and body for a validate request carrying this token."""
    if token == SERVICE_TOKEN:
        return 200, _SERVICE_BODY
    if token == READONLY_TOKEN:
        return 200, _READONLY_BODY
    if token == EXPIRED_TOKEN:
        return 401, _EXPIRED_BODY
    if token == REVOKED_TOKEN:
        return 401, _REVOKED_BODY
    if token.startswith(USER_TOKEN_PREFIX):
        user_id = token[len(USER_TOKEN_PREFIX) :]
        if not _UUID.fullmatch(user_id):
            return 401, _INVALID_BODY
        user_id = user_id.lower()
        return 200, orjson.dumps(
            {
                "success": True,
                "valid": True,
                "token": {
                    "id": token,
                    "expiresAt": tokens.now_ms() + TOKEN_TTL_MS,
                    "expiryType": "time",
                },
                "permissions": _USER,
                "userId": user_id,
                "tokenData": {"userId": user_id},
            }
        )
    if token.startswith(ISSUED_TOKEN_PREFIX):
        expires_at = tokens.issued_expiry(token)
        if expires_at is not None:
            return 200, orjson.dumps(
                {
                    "success": True,
                    "valid": True,
                    "token": {"id": token, "expiresAt": expires_at, "expiryType": "time"},
                    "permissions": _ALL,
                    "tokenData": {"service": "prefetch"},
                }
            )
        lapsed = tokens.lapsed_code(token)
        if lapsed == "TOKEN_REVOKED":
            return 401, _REVOKED_BODY
        if lapsed == "TOKEN_EXPIRED":
            return 401, _EXPIRED_BODY
    return 401, _INVALID_BODY


def _token_of(body: bytes) -> str | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(payload, dict) and isinstance(payload.get("token"), str):
        return str(payload["token"])
    return None


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON)


def ca_app(tokens: SandboxTokens, *, prefix: str = "") -> web.Application:
    """The CA application; `prefix` is the path of CA_URL, if it has one."""

    async def validate_handler(request: web.Request) -> web.Response:
        token = _token_of(await request.read())
        tokens.count_validate(token)
        if token is None:
            return web.Response(body=_INVALID_BODY, status=401, content_type=_JSON)
        status, body = validate(tokens, token)
        return web.Response(body=body, status=status, content_type=_JSON)

    async def service_handler(request: web.Request) -> web.Response:
        token, expires_at = tokens.issue()
        return _json({"success": True, "token": token, "expiresAt": expires_at})

    async def rotate_handler(request: web.Request) -> web.Response:
        return _json({"success": True, "revoked": tokens.rotate()})

    async def health_handler(request: web.Request) -> web.Response:
        return _json({"status": "healthy", "service": "sandbox-ca"})

    async def stats_handler(request: web.Request) -> web.Response:
        return _json(tokens.stats())

    async def reset_handler(request: web.Request) -> web.Response:
        tokens.reset_counters()
        return _json({"success": True})

    app = web.Application()
    app.router.add_post(prefix + "/api/tokens/validate", validate_handler)
    app.router.add_post(prefix + "/api/tokens/service", service_handler)
    app.router.add_post(prefix + "/__rotate", rotate_handler)
    app.router.add_get(prefix + "/health", health_handler)
    app.router.add_get(prefix + "/__stats", stats_handler)
    app.router.add_post(prefix + "/__reset", reset_handler)
    return app

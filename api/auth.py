"""Bearer-token authentication against the CA, with a per-process validation cache.

The CA rate-limits its validate endpoint and sits on every request's path, so each API
process remembers verdicts: a valid one for AUTH_CACHE_TTL but never past the token's own
`expiresAt`, an invalid one for 5 s, at most `auth_cache_size` tokens (least recently used
dropped first). Concurrent requests with an unknown token share one CA call. A cache hit
costs a dict lookup and a clock read.

Tokens up to MAX_RAW_KEY characters are cached under themselves (str), longer ones under
their SHA-256 digest (bytes): a str never equals a bytes, so no token can be mistaken for the
digest of another. A token that is not printable ASCII is refused without asking the CA.

Anything but a well-formed answer fails closed: a valid verdict whose user id is present but
empty or not a UUID (top level or in tokenData), or whose two user ids disagree, is a CA that
cannot be trusted right now (503 CA_UNAVAILABLE), never a service token.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from api import http_metrics
from engine import wire
from engine.errors import AuthError, CAUnavailable, Forbidden, PrefetchError
from engine.upstream import CAClient

INVALID_TTL_S: Final = 5.0
# Longer tokens are cached under their digest so that the cache's memory stays bounded.
MAX_RAW_KEY: Final = 256
PERMISSIONS: Final = ("read", "write", "append", "delete", "update")
# RFC 6750 tokens are printable ASCII; anything else cannot be a token the CA issued.
_TOKEN: Final = re.compile(r"[\x21-\x7e]+", re.ASCII)
_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII
)
# Routes without a {userId} (queue, metrics, activity, events) are for services only.
USER_TOKEN_REFUSED: Final = "User tokens may not use this route; use a service token"
# The CA's reason is quoted to the client only when it looks like a code.
_REASON: Final = re.compile(r"[A-Z][A-Z0-9_]{0,63}", re.ASCII)


@dataclass(frozen=True, slots=True)
class Grant:
    """The CA's verdict on a token, reduced to what route checks need."""

    valid: bool
    reason: str  # the CA's error code when invalid
    user_id: str | None  # set for user tokens (lowercase)
    permissions: frozenset[str]
    deadline: float  # time.monotonic() after which the verdict must be asked again


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, else 401 MISSING_TOKEN.

    A token with a byte outside printable ASCII is 401 INVALID_TOKEN, unasked.
    """
    if header:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if token and scheme.lower() == "bearer":
            if not _TOKEN.fullmatch(token):
                raise AuthError("Token rejected: INVALID_TOKEN", code="INVALID_TOKEN")
            return token
    raise AuthError("Authorization: Bearer <token> is required", code="MISSING_TOKEN")


def cache_key(token: str) -> str | bytes:
    """The validation cache's key: the token, or the digest (bytes) of a long one."""
    if len(token) <= MAX_RAW_KEY:
        return token
    return hashlib.sha256(token.encode("ascii")).digest()


def _refusal(grant: Grant, permission: str, user_id: str | None) -> PrefetchError | None:
    """Why `grant` does not admit `permission` on the route's user `user_id` (see
    `Authenticator.authorize`), or None when it does."""
    if not grant.valid:
        return AuthError(f"Token rejected: {grant.reason}", code="INVALID_TOKEN")
    if permission not in grant.permissions:
        return Forbidden(
            f"Token lacks the {permission} permission", code="INSUFFICIENT_PERMISSIONS"
        )
    if grant.user_id is not None and grant.user_id != user_id:
        if user_id is None:
            return Forbidden(USER_TOKEN_REFUSED, code="ACCESS_DENIED")
        return Forbidden("A user token may only access its own user", code="ACCESS_DENIED")
    return None


def _malformed(why: str) -> CAUnavailable:
    return CAUnavailable(f"Certificate authority sent a malformed answer: {why}")


def _user_of(verdict: wire.Validation) -> str | None:
    """The user of a valid verdict, None for a service token; CAUnavailable if malformed."""
    # The CA names the user at the top level; older answers only inside tokenData.
    candidates: list[object] = []
    if verdict.userId is not None:
        candidates.append(verdict.userId)
    if verdict.tokenData is not None and verdict.tokenData.get("userId") is not None:
        candidates.append(verdict.tokenData["userId"])
    users = set()
    for user in candidates:
        if not isinstance(user, str) or not _UUID.fullmatch(user):
            raise _malformed(f"userId {str(user)[:40]!r} is not a UUID")
        users.add(user.lower())
    if len(users) > 1:
        raise _malformed("userId and tokenData.userId differ")
    return users.pop() if users else None


def _reason(verdict: wire.Validation) -> str:
    reason = verdict.error or ""
    return reason if _REASON.fullmatch(reason) else "INVALID_TOKEN"


_permission_sets: dict[tuple[bool, ...], frozenset[str]] = {}


def _granted(permissions: wire.Permissions) -> frozenset[str]:
    """The granted permissions, as one shared frozenset per combination (at most 32)."""
    flags = tuple(getattr(permissions, name) is True for name in PERMISSIONS)
    found = _permission_sets.get(flags)
    if found is None:
        found = frozenset(name for name, on in zip(PERMISSIONS, flags, strict=True) if on)
        _permission_sets[flags] = found
    return found


class Authenticator:
    """Validates tokens through `CAClient`, caching verdicts; see the module docstring."""

    def __init__(self, ca: CAClient, ttl_ms: int, max_size: int) -> None:
        self._ca = ca
        self._ttl_s = ttl_ms / 1000
        self._max_size = max_size
        self._cache: OrderedDict[str | bytes, Grant] = OrderedDict()
        self._flights: dict[str | bytes, asyncio.Future[Grant]] = {}
        # Authorization header -> its token, for short headers already seen: a client sends
        # the same one on every request, and the parse is most of a cache hit's cost.
        self._tokens: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._cache)

    async def authorize(self, header: str | None, permission: str, user_id: str | None) -> Grant:
        """Check the request's token for `permission`; `user_id` is the route's own user.

        User tokens pass only when `user_id` is theirs: routes without one (queue, metrics,
        activity, events) pass None and so admit service tokens only.
        """
        token = self._tokens.get(header) if header is not None else None
        if token is None:
            token = bearer_token(header)
            if header is not None and len(header) <= MAX_RAW_KEY:
                if len(self._tokens) >= self._max_size:
                    self._tokens.clear()
                self._tokens[header] = token
        key = cache_key(token)
        grant = self._cache.get(key)
        if grant is None or grant.deadline <= time.monotonic():
            http_metrics.auth_miss()
            grant = await self._validate(key, token)
        else:
            http_metrics.auth_hit()
            self._cache.move_to_end(key)
        refusal = _refusal(grant, permission, user_id)
        if refusal is not None:
            raise refusal
        return grant

    def allows(self, header: str | None, permission: str, user_id: str) -> bool:
        """Whether a remembered, unexpired verdict lets `header` through as `authorize`
        would, without waiting; False also when there is none (the caller then authorizes)."""
        token = self._tokens.get(header) if header is not None else None
        if token is None:
            return False
        key = cache_key(token)
        grant = self._cache.get(key)
        if (
            grant is None
            or grant.deadline <= time.monotonic()
            or _refusal(grant, permission, user_id) is not None
        ):
            return False
        http_metrics.auth_hit()
        self._cache.move_to_end(key)
        return True

    async def _validate(self, key: str | bytes, token: str) -> Grant:
        """One CA call per token at a time, shared by every request that waits for it."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._ask(key, token))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # shield: a cancelled waiter must not cancel the call the others wait for.
        return await asyncio.shield(flight)

    def _landed(self, key: str | bytes, flight: asyncio.Future[Grant]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here so that an unawaited failure is not logged

    async def _ask(self, key: str | bytes, token: str) -> Grant:
        verdict = await self._ca.validate(token)  # CAUnavailable propagates, uncached
        now = time.monotonic()
        if verdict.valid:
            user = _user_of(verdict)  # a malformed answer raises CAUnavailable, uncached
            deadline = now + self._ttl_s
            expires_at = verdict.token.expiresAt if verdict.token is not None else None
            if expires_at is not None:
                deadline = min(deadline, now + expires_at / 1000 - time.time())
            grant = Grant(True, "", user, _granted(verdict.permissions), deadline)
        else:
            grant = Grant(False, _reason(verdict), None, frozenset(), now + INVALID_TTL_S)
        if grant.deadline > now:
            self._remember(key, grant)
        return grant

    def _remember(self, key: str | bytes, grant: Grant) -> None:
        cache = self._cache
        cache[key] = grant
        cache.move_to_end(key)
        while len(cache) > self._max_size:
            cache.popitem(last=False)

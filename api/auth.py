"""Bearer-token authentication against the CA, with a per-process validation cache.

The CA rate-limits its validate endpoint and sits on every request's path, so each API
process remembers verdicts: a valid one for AUTH_CACHE_TTL but never past the token's own
`expiresAt`, an invalid one for 5 s, at most `auth_cache_size` tokens (least recently used
dropped first). Concurrent requests with an unknown token share one CA call. A cache hit
costs a dict lookup and a clock read.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from engine import wire
from engine.errors import AuthError, Forbidden
from engine.upstream import CAClient

INVALID_TTL_S: Final = 5.0
# Longer tokens are cached under their digest so that the cache's memory stays bounded.
MAX_RAW_KEY: Final = 256
PERMISSIONS: Final = ("read", "write", "append", "delete", "update")


@dataclass(frozen=True, slots=True)
class Grant:
    """The CA's verdict on a token, reduced to what route checks need."""

    valid: bool
    reason: str  # the CA's error code when invalid
    user_id: str | None  # set for user tokens (lowercase)
    permissions: frozenset[str]
    deadline: float  # time.monotonic() after which the verdict must be asked again


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, else 401 MISSING_TOKEN."""
    if header:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if token and scheme.lower() == "bearer":
            return token
    raise AuthError("Authorization: Bearer <token> is required", code="MISSING_TOKEN")


def _user_of(verdict: wire.Validation) -> str | None:
    # The CA names the user at the top level; older answers only inside tokenData.
    user = verdict.userId
    if user is None and verdict.tokenData is not None:
        nested = verdict.tokenData.get("userId")
        user = nested if isinstance(nested, str) else None
    return user.lower() if user else None


class Authenticator:
    """Validates tokens through `CAClient`, caching verdicts; see the module docstring."""

    def __init__(self, ca: CAClient, ttl_ms: int, max_size: int) -> None:
        self._ca = ca
        self._ttl_s = ttl_ms / 1000
        self._max_size = max_size
        self._cache: OrderedDict[str, Grant] = OrderedDict()
        self._flights: dict[str, asyncio.Future[Grant]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    async def authorize(self, header: str | None, permission: str, user_id: str | None) -> Grant:
        """Check the request's token for `permission`; `user_id` is the route's own user.

        User tokens pass only when `user_id` is theirs: routes without one (queue, metrics,
        activity, events) pass None and so admit service tokens only.
        """
        token = bearer_token(header)
        key = token if len(token) <= MAX_RAW_KEY else hashlib.sha256(token.encode()).hexdigest()
        grant = self._cache.get(key)
        if grant is None or grant.deadline <= time.monotonic():
            grant = await self._validate(key, token)
        else:
            self._cache.move_to_end(key)
        if not grant.valid:
            raise AuthError(f"Token rejected: {grant.reason}", code="INVALID_TOKEN")
        if permission not in grant.permissions:
            raise Forbidden(
                f"Token lacks the {permission} permission", code="INSUFFICIENT_PERMISSIONS"
            )
        if grant.user_id is not None and grant.user_id != user_id:
            raise Forbidden("A user token may only access its own user", code="ACCESS_DENIED")
        return grant

    async def _validate(self, key: str, token: str) -> Grant:
        """One CA call per token at a time, shared by every request that waits for it."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._ask(key, token))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # shield: a cancelled waiter must not cancel the call the others wait for.
        return await asyncio.shield(flight)

    def _landed(self, key: str, flight: asyncio.Future[Grant]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here so that an unawaited failure is not logged

    async def _ask(self, key: str, token: str) -> Grant:
        verdict = await self._ca.validate(token)  # CAUnavailable propagates, uncached
        now = time.monotonic()
        if verdict.valid:
            deadline = now + self._ttl_s
            expires_at = verdict.token.expiresAt if verdict.token is not None else None
            if expires_at is not None:
                deadline = min(deadline, now + expires_at / 1000 - time.time())
            granted = frozenset(p for p in PERMISSIONS if getattr(verdict.permissions, p))
            grant = Grant(True, "", _user_of(verdict), granted, deadline)
        else:
            reason = verdict.error or "INVALID_TOKEN"
            grant = Grant(False, reason, None, frozenset(), now + INVALID_TTL_S)
        if grant.deadline > now:
            self._remember(key, grant)
        return grant

    def _remember(self, key: str, grant: Grant) -> None:
        cache = self._cache
        cache[key] = grant
        cache.move_to_end(key)
        while len(cache) > self._max_size:
            cache.popitem(last=False)

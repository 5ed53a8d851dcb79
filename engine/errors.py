"""The one exception hierarchy of the service.

`PrefetchError` is the root. Errors that reach an HTTP client carry their status and code so
that the API answers them without a lookup table; `retryable` tells the job engine whether a
failed prefetch is worth another attempt.
"""

from __future__ import annotations


class PrefetchError(Exception):
    """Base of every error raised on purpose by this code base."""

    status = 500
    code = "INTERNAL_ERROR"
    retryable = False

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(PrefetchError):
    """A configuration value is missing or malformed."""

    code = "CONFIG_ERROR"


# --- request errors (4xx) -------------------------------------------------------------------


class BadRequest(PrefetchError):
    """The request is malformed."""

    status = 400
    code = "BAD_REQUEST"


class NotFound(PrefetchError):
    """Not found."""

    status = 404
    code = "NOT_FOUND"


class Conflict(PrefetchError):
    """The resource is not in a state that allows this."""

    status = 409
    code = "CONFLICT"


class AuthError(PrefetchError):
    """Authentication failed."""

    status = 401
    code = "INVALID_TOKEN"


class Forbidden(PrefetchError):
    """The token may not do this."""

    status = 403
    code = "INSUFFICIENT_PERMISSIONS"


# --- dependency errors ----------------------------------------------------------------------


class CAUnavailable(PrefetchError):
    """The certificate authority cannot be reached."""

    status = 503
    code = "CA_UNAVAILABLE"


class UpstreamError(PrefetchError):
    """The timeline service answered with an error or an unusable body."""

    status = 502
    code = "PREFETCH_FAILED"


class UpstreamRetryable(UpstreamError):
    """The timeline service failed in a way that may pass (connection error, 5xx)."""

    retryable = True


class UpstreamTimeout(UpstreamRetryable):
    """The timeline service did not answer in time."""

    status = 504
    code = "UPSTREAM_TIMEOUT"


class UpstreamNotFound(UpstreamError):
    """The timeline service has no such user."""

    status = 404
    code = "NOT_FOUND"


class UpstreamAuthError(UpstreamError):
    """The timeline service refused our service token."""


class RedisUnavailable(PrefetchError):
    """Redis cannot be reached."""

    status = 503
    code = "REDIS_UNAVAILABLE"


class BrokerUnavailable(PrefetchError):
    """The message broker cannot be reached, or did not confirm a message in time."""

    status = 503
    code = "QUEUE_UNAVAILABLE"


class BrokerTimeout(BrokerUnavailable):
    """The message broker did not confirm a message in time: it may still land."""


class RedisReplyError(PrefetchError):
    """Redis answered a command with an error reply (WRONGTYPE, NOSCRIPT, ...)."""

    status = 500
    code = "INTERNAL_ERROR"

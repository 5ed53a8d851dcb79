"""The one exception hierarchy of the service.

`PrefetchError` is the root. Errors that reach an HTTP client carry their status and code so
that the API answers them without a lookup table; `retryable` tells the job engine whether a
failed prefetch is worth another attempt.

The message (`str(exc)`) is for logs and may name hosts, ports and parser positions; a client
sees `public_message`: the message itself for request errors and for errors whose messages
are written to be shown (the upstream ones), a fixed text otherwise.

Redis answers some commands with an error reply that says "not now" rather than "wrong
command": out of memory under `noeviction`, still loading its dataset, a read-only replica,
a master link down, a busy script. `redis_reply_error` turns those into `RedisRefused`, a
503 that callers treat like an unreachable Redis; it is the one place that knows them.
"""

from __future__ import annotations

from typing import Final


class PrefetchError(Exception):
    """Base of every error raised on purpose by this code base."""

    status = 500
    code = "INTERNAL_ERROR"
    retryable = False
    # What a client is told instead of the message; None when the message itself is safe.
    public: str | None = "Internal server error"

    def __init__(
        self, message: str = "", *, code: str | None = None, public: str | None = None
    ) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        if code is not None:
            self.code = code
        if public is not None:
            self.public = public

    @property
    def message(self) -> str:
        return str(self)

    @property
    def public_message(self) -> str:
        """The text an HTTP client may see: no host, port or parser detail."""
        return self.message if self.public is None else self.public


class ConfigError(PrefetchError):
    """A configuration value is missing or malformed."""

    code = "CONFIG_ERROR"
    public = None


# --- request errors (4xx) -------------------------------------------------------------------


class BadRequest(PrefetchError):
    """The request is malformed."""

    status = 400
    code = "BAD_REQUEST"
    public = None


class RequestTimeout(BadRequest):
    """The client did not send its request body in time."""

    status = 408
    code = "REQUEST_TIMEOUT"


class UnsupportedEncoding(BadRequest):
    """The request body is compressed in a way the API does not read."""

    status = 415
    code = "UNSUPPORTED_ENCODING"


class NotFound(PrefetchError):
    """Not found."""

    status = 404
    code = "NOT_FOUND"
    public = None


class Conflict(PrefetchError):
    """The resource is not in a state that allows this."""

    status = 409
    code = "CONFLICT"
    public = None


class AuthError(PrefetchError):
    """Authentication failed."""

    status = 401
    code = "INVALID_TOKEN"
    public = None


class Forbidden(PrefetchError):
    """The token may not do this."""

    status = 403
    code = "INSUFFICIENT_PERMISSIONS"
    public = None


# --- dependency errors ----------------------------------------------------------------------


class CAUnavailable(PrefetchError):
    """The certificate authority cannot be reached, or sent an answer we cannot trust."""

    status = 503
    code = "CA_UNAVAILABLE"
    public = "Certificate authority unavailable"


class UpstreamError(PrefetchError):
    """The timeline service answered with an error or an unusable body.

    Its messages are shown to clients (and kept as a failed job's reason), so they are
    written without hosts, ports or decoder positions.
    """

    status = 502
    code = "PREFETCH_FAILED"
    public = None


class UpstreamRetryable(UpstreamError):
    """The timeline service failed in a way that may pass (connection error, 5xx)."""

    retryable = True


class UpstreamTimeout(UpstreamRetryable):
    """The timeline service did not answer in time."""

    status = 504
    code = "UPSTREAM_TIMEOUT"


class JobDeadlineExceeded(UpstreamTimeout):
    """A prefetch outlived its job deadline (PREFETCH_JOB_DEADLINE): retried like a timeout."""


class UpstreamNotFound(UpstreamError):
    """The timeline service has no such user."""

    status = 404
    code = "NOT_FOUND"


class UpstreamAuthError(UpstreamError):
    """The timeline service refused our service token."""


class Busy(PrefetchError):
    """The service cannot take this now (a buffer is full); the client may retry."""

    status = 503
    code = "SERVICE_UNAVAILABLE"
    public = "Service busy; retry later"


class RedisUnavailable(PrefetchError):
    """Redis cannot be reached."""

    status = 503
    code = "REDIS_UNAVAILABLE"
    retryable = True
    public = "Redis is unavailable"


class BrokerUnavailable(PrefetchError):
    """The message broker cannot be reached, or did not confirm a message in time."""

    status = 503
    code = "QUEUE_UNAVAILABLE"
    retryable = True
    public = "The job queue is unavailable"


class BrokerTimeout(BrokerUnavailable):
    """The message broker did not confirm a message in time: it may still land."""


class RedisReplyError(PrefetchError):
    """Redis answered a command with an error reply (WRONGTYPE, NOSCRIPT, ...)."""

    status = 500
    code = "INTERNAL_ERROR"


class PortInUse(PrefetchError):
    """A port this process must listen on is taken (the CLI exits 2, as for a bad setting)."""

    code = "PORT_IN_USE"


class RedisRefused(RedisUnavailable, RedisReplyError):
    """Redis is up but refuses commands for now (OOM, LOADING, READONLY, ...).

    Both a RedisUnavailable (try again later: nothing was written) and a RedisReplyError (it
    is an error reply, in a pipeline's results like any other).
    """

    code = "REDIS_REFUSED"

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, public=f"Redis is refusing commands ({kind})")
        self.kind = kind


# The first word of the error replies that mean "not now": the reply's kind.
REFUSALS: Final = frozenset(
    {
        "OOM",
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "BUSY",
        "MISCONF",
        "NOREPLICAS",
        "TRYAGAIN",
        "CLUSTERDOWN",
    }
)


def redis_reply_error(reply: RedisReplyError) -> RedisReplyError:
    """`reply` as a RedisRefused when it is a refusal, else itself."""
    kind = str(reply).split(" ", 1)[0]
    if kind in REFUSALS and not isinstance(reply, RedisRefused):
        return RedisRefused(str(reply), kind)
    return reply

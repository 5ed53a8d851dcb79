"""Every response the tests provoke, checked against the contract (api/openapi.yaml).

`check_response` validates one response with openapi-core: the operation (path and method),
the status among the operation's documented ones, the headers it declares (X-Request-Id on
every response, ETag and Cache-Control on cached reads) and the body against its schema. A
response outside the document fails the test that provoked it.

What no operation can describe (a path with no route, a method the path lacks, HTTP too
malformed to name a route) must still be the error envelope with a documented code and an
X-Request-Id: `check_unrouted`.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_schema_validator import OAS31Validator
from werkzeug.datastructures import Headers, ImmutableMultiDict

from api import contract

# Answers that reach a client before (or without) a route: status -> codes.
UNROUTED = {
    400: {"BAD_REQUEST"},
    404: {"NOT_FOUND"},
    405: {"METHOD_NOT_ALLOWED"},
    408: {"REQUEST_TIMEOUT"},
    503: {"SERVICE_UNAVAILABLE"},
}
METHODS = frozenset({"get", "post", "put", "patch", "delete", "head", "options", "trace"})


@cache
def _openapi() -> OpenAPI:
    return OpenAPI.from_dict(contract.document())


@cache
def _server() -> str:
    server: str = contract.document()["servers"][0]["url"]
    return server


@cache
def _error_validator() -> OAS31Validator:
    return OAS31Validator(contract.document()["components"]["schemas"]["Error"])


@dataclass
class _Request:
    """The request half, as openapi-core needs it to find the operation."""

    host_url: str
    path: str
    method: str
    parameters: RequestParameters = field(default_factory=RequestParameters)
    content_type: str = "application/json"
    body: bytes | None = None


@dataclass
class _Response:
    status_code: int
    headers: Headers
    content_type: str
    data: bytes | None


def _plain(headers: Mapping[str, str], body: bytes) -> bytes:
    """The body as JSON bytes, inflated when a client kept it gzip-coded."""
    if headers.get("Content-Encoding", "").lower() == "gzip" and body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    return body


def check_response(
    method: str, target: str, status: int, headers: Mapping[str, str], body: bytes
) -> None:
    """Fail (AssertionError) unless the response is one the document describes."""
    parts = urlsplit(target)
    lowered = {name.lower(): value for name, value in headers.items()}
    request = _Request(
        host_url=_server(),
        path=parts.path,
        method=method.lower(),
        parameters=RequestParameters(query=ImmutableMultiDict(parse_qsl(parts.query))),
    )
    plain = _plain(lowered, body)
    response = _Response(
        status_code=status,
        headers=Headers(list(headers.items())),
        content_type=lowered.get("content-type", ""),
        data=plain,
    )
    try:
        _openapi().validate_response(request, response)
    except (PathNotFound, OperationNotFound):
        check_unrouted(status, headers, plain, f"{method} {target}")
    except OpenAPIError as exc:
        raise AssertionError(
            f"{method} {target} -> {status} is outside api/openapi.yaml: {_explain(exc)}\n"
            f"headers: {dict(headers)}\nbody: {plain[:600]!r}"
        ) from None


def check_unrouted(status: int, headers: Mapping[str, str], body: bytes, what: str) -> None:
    """An answer no operation describes: the envelope, a documented code, a request id."""
    lowered = {name.lower(): value for name, value in headers.items()}
    assert status in UNROUTED, f"{what} -> {status}: no route answers it, and no rule allows it"
    assert lowered.get("content-type", "").startswith("application/json"), (what, headers)
    assert lowered.get("x-request-id"), f"{what} -> {status} without X-Request-Id"
    envelope: Any = orjson.loads(body)
    errors = [error.message for error in _error_validator().iter_errors(envelope)]
    assert not errors, f"{what} -> {status}: not the error envelope: {errors}"
    assert envelope["error"] in UNROUTED[status], f"{what} -> {status} {envelope['error']}"


def check_raw(payload: bytes, status: int, headers: Mapping[str, str], body: bytes) -> None:
    """A response read off a raw socket, for the request `payload` that was written.

    When the request line names a method and a path, the operation's responses apply;
    otherwise (garbage, an unknown method) only the unrouted rules.
    """
    line = payload.split(b"\r\n", 1)[0].decode("latin-1")
    words = line.split(" ")
    if len(words) == 3 and words[0].lower() in METHODS and words[1].startswith("/"):
        check_response(words[0], words[1], status, headers, body)
    else:
        check_unrouted(status, headers, body, repr(line[:40]))


def check_raw_answer(payload: bytes, answer: bytes) -> None:
    """A whole HTTP/1.1 answer read off a socket until close (status line, headers, body)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    check_raw(payload, int(lines[0].split(" ")[1]), headers, body)


def _explain(exc: BaseException) -> str:
    """openapi-core's error with the schema errors under it."""
    lines = [f"{type(exc).__name__}: {exc}"]
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None:
        lines.append(f"{type(cause).__name__}: {cause}")
        for error in getattr(cause, "schema_errors", ()) or ():
            where = "/".join(str(p) for p in getattr(error, "path", ()))
            lines.append(f"  at {where or '(root)'}: {error.message}")
        cause = cause.__cause__ or cause.__context__
    return "\n".join(lines)

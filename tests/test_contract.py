"""The contract (api/openapi.yaml) against the code: served, complete, and enforced.

Every response of the suite is validated against the document by `ApiClient.call` (and the
raw-socket tests); these tests check the document itself: it is valid OpenAPI 3.1, served at
/openapi.json, names every route the app has and no other, every error code the code can
send, and token kinds that match what the API admits; and the checker does fail on a
response outside it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from openapi_spec_validator import validate

from api import contract, create_app, middlewares
from api.auth import USER_TOKEN_REFUSED
from api.server import connections
from engine.settings import Settings
from sandbox.ca import user_token
from tests.conftest import ApiClient, new_user
from tests.contract import check_response, check_unrouted

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("get", "post", "put", "patch", "delete")
# Codes in the source that never reach an HTTP client: the CLI's, and fallbacks for statuses
# aiohttp does not produce (api.middlewares / api.server map every status they know).
NOT_HTTP = {"CONFIG_ERROR", "PORT_IN_USE", "HTTP_ERROR", "GATEWAY_TIMEOUT", "CONFLICT"}


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, item[method])
        for path, item in contract.document()["paths"].items()
        for method in METHODS
        if method in item
    ]


def test_the_document_is_valid_openapi_3_1() -> None:
    document = contract.document()
    assert document["openapi"].startswith("3.1")
    validate(document)


async def test_openapi_json_is_the_document_without_auth(api: ApiClient) -> None:
    reply = await api.call("GET", "/openapi.json", token=None)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.body == contract.document()


def test_every_route_is_documented_and_every_documented_route_exists(settings: Settings) -> None:
    app = create_app(settings)
    routed = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    documented = {(method, path) for method, path, _ in operations()}
    assert routed == documented


def test_every_error_code_the_code_sends_is_documented() -> None:
    sources = [*ROOT.joinpath("api").rglob("*.py"), *ROOT.joinpath("engine").rglob("*.py")]
    found: set[str] = set()
    for source in sources:
        found |= set(re.findall(r'\bcode(?:=| = )"([A-Z][A-Z_]+)"', source.read_text()))
    # What aiohttp answers itself, mapped by the middleware and the server.
    found |= {code for code, _ in middlewares._HTTP_CODES.values()}
    found |= set(connections._STATUS_CODES.values())
    documented = set(
        contract.document()["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    )
    assert {"REDIS_REFUSED", "JOB_NOT_FAILED", "ACCESS_DENIED", "PAYLOAD_TOO_LARGE"} <= found
    assert found - NOT_HTTP <= documented, sorted(found - NOT_HTTP - documented)
    assert documented <= found, sorted(documented - found)


def test_every_operation_names_the_token_kinds_it_admits() -> None:
    for method, path, operation in operations():
        kinds = operation["x-token-kinds"]
        if not path.startswith("/api/"):
            assert kinds == [] and operation["security"] == [], path
        elif "{userId}" in path:
            assert kinds == ["service", "user"], path
        else:
            assert kinds == ["service"], path
        assert "x-permission" in operation or not kinds, (method, path)


def _call_for(method: str, path: str, user: str) -> tuple[str, dict[str, Any] | None]:
    target = path.format(userId=user, jobId=f"prefetch:{user}:1", date="2024-12-21")
    bodies = {
        "/api/activity": {"userIds": [user]},
        "/api/prefetch/events": {"type": "post.created", "userId": user},
    }
    return target, bodies.get(path, {} if method == "post" else None)


async def test_token_kinds_are_what_the_api_admits(api: ApiClient) -> None:
    user = new_user()
    token = user_token(user)
    for method, path, operation in operations():
        if not path.startswith("/api/"):
            continue
        target, body = _call_for(method, path, user)
        reply = await api.call(method.upper(), target, token=token, json=body)
        if "user" in operation["x-token-kinds"]:
            assert reply.status < 500 and reply.status != 403, (path, reply.body)
        else:
            assert reply.status == 403, path
            assert reply.body["error"] == "ACCESS_DENIED"
            assert reply.body["message"] == USER_TOKEN_REFUSED


def _headers(**values: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    headers.update(values)
    return headers


LIVE = b'{"status":"alive"}'


def test_the_checker_passes_a_documented_response() -> None:
    check_response("GET", "/health/live", 200, _headers(**{"X-Request-Id": "abc123"}), LIVE)


@pytest.mark.parametrize(
    ("status", "headers", "body", "why"),
    [
        (200, {"X-Request-Id": "abc123"}, b'{"status":"alive","extra":1}', "an undocumented field"),
        (200, {"X-Request-Id": "abc123"}, b'{"status":"dead"}', "a value outside the enum"),
        (418, {"X-Request-Id": "abc123"}, LIVE, "an undocumented status"),
        (200, {}, LIVE, "no X-Request-Id"),
    ],
)
def test_the_checker_fails_a_response_outside_the_document(
    status: int, headers: dict[str, str], body: bytes, why: str
) -> None:
    with pytest.raises(AssertionError):
        check_response("GET", "/health/live", status, _headers(**headers), body)


def test_the_checker_fails_an_error_code_the_operation_does_not_send() -> None:
    body = b'{"success":false,"error":"INVALID_DATE","message":"x"}'
    with pytest.raises(AssertionError):
        check_response(
            "GET", f"/api/cache/{new_user()}", 400, _headers(**{"X-Request-Id": "a1"}), body
        )
    check_response("GET", "/api/prefetch/metrics/x", 400, _headers(**{"X-Request-Id": "a1"}), body)


def test_unrouted_answers_must_be_the_envelope_with_their_code() -> None:
    ok = b'{"success":false,"error":"NOT_FOUND","message":"Route not found"}'
    check_response("GET", "/nowhere", 404, _headers(**{"X-Request-Id": "a1"}), ok)
    with pytest.raises(AssertionError):
        check_unrouted(
            404, _headers(**{"X-Request-Id": "a1"}), ok.replace(b"NOT_FOUND", b"OOPS"), "x"
        )
    with pytest.raises(AssertionError):
        check_unrouted(404, _headers(), ok, "x")
    with pytest.raises(AssertionError):
        check_unrouted(500, _headers(**{"X-Request-Id": "a1"}), ok, "x")

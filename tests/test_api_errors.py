"""The error envelope, request ids, route errors and input validation shared by all routes."""

from __future__ import annotations

import re

import pytest

from engine.store import keys
from engine.store.fastredis import FastRedis
from tests.conftest import ApiClient, new_user

pytestmark = pytest.mark.timeout(30)

GENERATED_ID = re.compile(r"^[0-9a-f]{16}$")


async def test_unknown_route_is_404(api: ApiClient) -> None:
    reply = await api.call("GET", "/api/nothing-here")
    assert reply.status == 404
    assert reply.body == {"success": False, "error": "NOT_FOUND", "message": "Route not found"}
    assert GENERATED_ID.match(reply.headers["X-Request-Id"])


async def test_wrong_method_is_405(api: ApiClient) -> None:
    reply = await api.call("POST", f"/api/cache/{new_user()}")
    assert reply.status == 405
    assert reply.body["error"] == "METHOD_NOT_ALLOWED"
    assert "GET" in reply.headers["Allow"]
    assert "X-Request-Id" in reply.headers


async def test_request_id_is_echoed_when_sane(api: ApiClient) -> None:
    for method, path, status in [
        ("GET", "/health/live", 200),
        ("GET", f"/api/cache/{new_user()}", 200),
        ("GET", "/api/cache/not-a-uuid", 400),
        ("GET", "/nowhere", 404),
    ]:
        headers = {"X-Request-Id": "trace-42.abc:7"}
        reply = await api.call(method, path, headers=headers)
        assert reply.status == status
        assert reply.headers["X-Request-Id"] == "trace-42.abc:7"
    missing = await api.call("GET", "/api/prefetch/queue/stats", token=None)
    assert missing.status == 401 and GENERATED_ID.match(missing.headers["X-Request-Id"])


@pytest.mark.parametrize("incoming", ["has space", "x" * 200, "-leading-dash", "semi;colon"])
async def test_insane_request_ids_are_replaced(api: ApiClient, incoming: str) -> None:
    reply = await api.call("GET", "/health/live", headers={"X-Request-Id": incoming})
    assert GENERATED_ID.match(reply.headers["X-Request-Id"])


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/cache/{bad}"),
        ("GET", "/api/cache/status/{bad}"),
        ("DELETE", "/api/cache/{bad}/timeline"),
        ("POST", "/api/prefetch/schedule/{bad}"),
        ("POST", "/api/prefetch/immediate/{bad}"),
    ],
)
@pytest.mark.parametrize(
    "bad",
    ["not-a-uuid", "550e8400e29b41d4a716446655440000", "550e8400-e29b-41d4-a716-44665544000g"],
)
async def test_user_id_must_be_a_uuid(api: ApiClient, method: str, path: str, bad: str) -> None:
    reply = await api.call(method, path.format(bad=bad))
    assert reply.status == 400
    assert reply.body["error"] == "INVALID_UUID"


async def test_malformed_json_is_400(api: ApiClient) -> None:
    headers = {"Content-Type": "application/json"}
    for path in (f"/api/prefetch/schedule/{new_user()}", "/api/activity", "/api/prefetch/events"):
        reply = await api.call("POST", path, data=b'{"priority": ', headers=headers)
        assert reply.status == 400, path
        assert reply.body["error"] == "INVALID_JSON", path


async def test_json_that_is_not_an_object_is_400(api: ApiClient) -> None:
    for body in ([1, 2], "high", 3):
        reply = await api.call("POST", f"/api/prefetch/schedule/{new_user()}", json=body)
        assert reply.status == 400
        assert reply.body["error"] == "INVALID_BODY"


async def test_body_over_64_kb_is_413(api: ApiClient) -> None:
    big = {"userIds": [new_user() for _ in range(1000)], "pad": "x" * 70_000}
    for path in (f"/api/prefetch/schedule/{new_user()}", "/api/activity"):
        reply = await api.call("POST", path, json=big)
        assert reply.status == 413, path
        assert reply.body["error"] == "PAYLOAD_TOO_LARGE", path
        assert "X-Request-Id" in reply.headers


async def test_unexpected_failure_is_500_without_internals(
    api: ApiClient, redis_roles: dict[str, FastRedis], caplog: pytest.LogCaptureFixture
) -> None:
    user = new_user()
    # A hash where a timeline string belongs: Redis answers WRONGTYPE to the read.
    await redis_roles["hot"].execute("HSET", keys.timeline("hot", user), "a", "b")
    reply = await api.call("GET", f"/api/cache/{user}", headers={"X-Request-Id": "boom-1"})
    assert reply.status == 500
    assert reply.body == {
        "success": False,
        "error": "INTERNAL_ERROR",
        "message": "Internal server error",
    }
    assert b"WRONGTYPE" not in reply.raw
    assert reply.headers["X-Request-Id"] == "boom-1"
    logged = [record for record in caplog.records if "boom-1" in record.getMessage()]
    assert logged and logged[0].exc_info is not None, "logged with its request id and cause"

"""Hostile HTTP over raw sockets: every answer is the JSON envelope with a request id.

Compressed bodies the API cannot or will not read, bodies that never finish, headers that
never finish, and requests aiohttp's parser rejects (long lines, too many headers, unknown
methods, Content-Length with Transfer-Encoding, bad chunks). None of them may answer 500,
hang a handler, echo the input back, or log a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import pytest
import pytest_asyncio

from engine.settings import Settings
from tests.conftest import ApiClient, new_user, serve_api
from tests.contract import check_raw, check_raw_answer

pytestmark = pytest.mark.timeout(60)

AUTH = b"Authorization: Bearer sandbox-service\r\n"


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, object]:
        parsed = orjson.loads(self.body)
        assert isinstance(parsed, dict)
        return parsed


async def send_raw(url: str, payload: bytes, *, cap: float = 20) -> RawReply:
    """Write `payload` on a new connection (kept open, never half-closed) and read one
    response; `cap` only stops a hung server from hanging the test."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(payload)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), cap)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), cap)
        check_raw(payload, status, headers, body)  # the contract holds for raw answers too
        return RawReply(status, headers, body)
    finally:
        writer.close()


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\n".encode()
        + AUTH
        + b"Content-Type: application/json\r\n"
        + b"".join(header + b"\r\n" for header in headers)
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def assert_envelope(reply: RawReply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json")
    assert len(reply.headers["x-request-id"]) >= 8
    body = reply.json
    assert body["success"] is False and body["error"] == code, body


@pytest_asyncio.fixture
async def quick_api(settings: Settings) -> AsyncIterator[ApiClient]:
    """The API with short header and body deadlines."""
    fast = settings.with_overrides(api_header_timeout_ms=300, api_body_timeout_ms=300)
    async with serve_api(fast) as client:
        yield client


async def test_a_gzip_body_is_read(api: ApiClient) -> None:
    body = gzip.compress(b'{"priority": "high"}')
    reply = await send_raw(
        api.url, post(f"/api/prefetch/schedule/{new_user()}", body, b"Content-Encoding: gzip")
    )
    assert reply.status == 202 and reply.json["data"]["priority"] == "high"  # type: ignore[index]
    deflated = zlib.compress(b'{"priority": "low"}')
    reply = await send_raw(
        api.url,
        post(f"/api/prefetch/schedule/{new_user()}", deflated, b"Content-Encoding: deflate"),
    )
    assert reply.status == 202 and reply.json["data"]["priority"] == "low"  # type: ignore[index]


@pytest.mark.parametrize("encoding", [b"br", b"zstd", b"compress", b"gzip, br"])
async def test_an_encoding_we_do_not_read_is_415(api: ApiClient, encoding: bytes) -> None:
    reply = await send_raw(
        api.url,
        post(
            f"/api/prefetch/schedule/{new_user()}",
            b"\x1b\x00\xf8",
            b"Content-Encoding: " + encoding,
        ),
    )
    assert_envelope(reply, 415, "UNSUPPORTED_ENCODING")


@pytest.mark.parametrize(
    "body",
    [
        b"not gzip at all",
        gzip.compress(b'{"priority": "high"}')[:12],  # cut short
        gzip.compress(b'{"priority": "high"}') + b"trailing",
    ],
    ids=["invalid", "truncated", "trailing-garbage"],
)
async def test_a_mangled_gzip_body_is_400(api: ApiClient, body: bytes) -> None:
    reply = await send_raw(
        api.url, post(f"/api/prefetch/schedule/{new_user()}", body, b"Content-Encoding: gzip")
    )
    assert_envelope(reply, 400, "INVALID_BODY")


async def test_a_gzip_bomb_is_413_not_inflated(api: ApiClient) -> None:
    bomb = gzip.compress(b'{"pad": "' + b"x" * 10_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    reply = await send_raw(
        api.url, post(f"/api/prefetch/schedule/{new_user()}", bomb, b"Content-Encoding: gzip")
    )
    assert_envelope(reply, 413, "PAYLOAD_TOO_LARGE")


async def test_a_body_that_never_finishes_is_408_not_a_hung_handler(quick_api: ApiClient) -> None:
    whole = post(f"/api/prefetch/schedule/{new_user()}", b'{"priority": "high"}')
    started = time.monotonic()
    reply = await send_raw(quick_api.url, whole[:-5])  # 5 bytes never come
    assert_envelope(reply, 408, "REQUEST_TIMEOUT")
    assert time.monotonic() - started >= 0.29  # it did wait for the body first


async def test_a_truncated_gzip_body_that_never_finishes_is_408(quick_api: ApiClient) -> None:
    body = gzip.compress(b'{"priority": "high"}')
    head = post(f"/api/prefetch/schedule/{new_user()}", body, b"Content-Encoding: gzip")
    reply = await send_raw(quick_api.url, head[: -len(body) // 2])
    assert_envelope(reply, 408, "REQUEST_TIMEOUT")


async def test_a_chunked_body_that_stops_mid_chunk_is_408(quick_api: ApiClient) -> None:
    payload = (
        f"POST /api/prefetch/schedule/{new_user()} HTTP/1.1\r\nHost: t\r\n".encode()
        + AUTH
        + b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"prio'
    )
    reply = await send_raw(quick_api.url, payload)
    assert_envelope(reply, 408, "REQUEST_TIMEOUT")


async def test_headers_that_never_finish_get_408_and_a_close(quick_api: ApiClient) -> None:
    parts = urlsplit(quick_api.url)
    for partial in (b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ", b""):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(partial)
        answer = await asyncio.wait_for(reader.read(), 20)  # until the server closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"error":"REQUEST_TIMEOUT"' in answer and b"X-Request-Id: " in answer
        check_raw_answer(partial, answer)
        assert time.monotonic() - started >= 0.29


async def test_a_kept_alive_connection_may_idle_past_the_header_deadline(
    quick_api: ApiClient,
) -> None:
    parts = urlsplit(quick_api.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    request = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"
    try:
        writer.write(request)
        first = await asyncio.wait_for(reader.readuntil(b'"alive"}'), 10)
        assert first.startswith(b"HTTP/1.1 200 ")
        # The scenario itself: idle between requests for twice the header deadline.
        await asyncio.sleep(0.6)
        writer.write(request)
        second = await asyncio.wait_for(reader.readuntil(b'"alive"}'), 10)
        assert second.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def test_a_non_utf8_token_over_256_bytes_is_401(api: ApiClient) -> None:
    token = b"\xff\xfe" * 200
    payload = (
        f"GET /api/cache/{new_user()} HTTP/1.1\r\nHost: t\r\n".encode()
        + b"Authorization: Bearer "
        + token
        + b"\r\n\r\n"
    )
    reply = await send_raw(api.url, payload)
    assert_envelope(reply, 401, "INVALID_TOKEN")
    assert (await api.ca_stats())["validateCalls"] == 0


MALFORMED = {
    "long-url": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    "long-header": b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
    "many-headers": b"GET /health/live HTTP/1.1\r\n"
    + b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    "unknown-method": b"FROB<> /health/live HTTP/1.1\r\nHost: t\r\n\r\n",
    "cl-and-te": b"POST /api/activity HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk": b"POST /api/activity HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_what_the_parser_rejects_gets_the_envelope_and_one_log_line(
    api: ApiClient, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reply = await send_raw(api.url, MALFORMED[name])
    assert_envelope(reply, 400, "BAD_REQUEST")
    # Nothing of the input comes back: no echo, no parser position.
    for echoed in (b"aaaa", b"bbbb", b"X-H1", b"FROB", b"zz", b"chunked", b"^"):
        assert echoed not in reply.body
    server_records = [r for r in caplog.records if r.name.startswith(("api", "aiohttp"))]
    assert len(server_records) == 1, [r.getMessage() for r in server_records]
    assert server_records[0].exc_info is None
    assert "\n" not in server_records[0].getMessage()
    assert reply.headers["x-request-id"] in server_records[0].getMessage()


async def test_a_flood_of_malformed_requests_logs_one_line(
    api: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        reply = await send_raw(api.url, MALFORMED["unknown-method"])
        assert reply.status == 400
    lines = [r for r in caplog.records if r.name.startswith(("api", "aiohttp"))]
    assert len(lines) == 1

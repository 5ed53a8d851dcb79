"""api/raw_response.py: a response written whole says what aiohttp would have said.

Over a raw connection to the API (its app path: HEAD, HTTP/1.0 and `Connection: close` are
never taken by the hot path, so these go through RawResponse.prepare): a HEAD gets the GET's
head and no body, HTTP/1.0 gets its own status line and the connection closes after it, and
an HTTP/1.1 `Connection: close` gets `Connection: close` back and then the end of the stream.
"""

from __future__ import annotations

import asyncio

import pytest

from engine.settings import Settings
from tests.conftest import SERVICE_TOKEN, new_user, serve_api

pytestmark = pytest.mark.timeout(60)


async def _answer(reader: asyncio.StreamReader, *, body: bool = True) -> tuple[str, dict, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in head[1:] if line)}
    length = int(fields["content-length"])
    return head[0], fields, await reader.readexactly(length) if body else b""


async def test_head_http10_and_close_are_answered_as_aiohttp_would(settings: Settings) -> None:
    user = new_user()
    async with serve_api(settings) as api:
        assert (await api.call("GET", f"/api/cache/{user}")).status == 200  # now cached
        host, port = api.url.removeprefix("http://").split(":")
        auth = f"Host: t\r\nAuthorization: Bearer {SERVICE_TOKEN}\r\nAccept-Encoding: gzip\r\n"

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /api/cache/{user} HTTP/1.1\r\n{auth}\r\n".encode())
        status, got, body = await _answer(reader)
        assert status == "HTTP/1.1 200 OK" and got["content-encoding"] == "gzip"
        assert "connection" not in got and len(body) == int(got["content-length"])
        # HEAD: the same head, no body; the connection serves on (the GET after it).
        writer.write(f"HEAD /api/cache/{user} HTTP/1.1\r\n{auth}\r\n".encode())
        writer.write(f"GET /api/cache/{user} HTTP/1.1\r\n{auth}\r\n".encode())
        status, head, _ = await _answer(reader, body=False)
        assert status == "HTTP/1.1 200 OK"
        assert head["content-length"] == got["content-length"] and head["etag"] == got["etag"]
        status, _, again = await _answer(reader)
        assert status == "HTTP/1.1 200 OK" and again == body
        # Connection: close is answered with it, and the stream ends.
        writer.write(f"GET /api/cache/{user} HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode())
        status, closing, again = await _answer(reader)
        assert status == "HTTP/1.1 200 OK" and closing["connection"] == "close"
        assert again == body and await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

        # HTTP/1.0 without keep-alive: its own status line, then the stream ends.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /api/cache/{user} HTTP/1.0\r\n{auth}\r\n".encode())
        status, old, again = await _answer(reader)
        assert status == "HTTP/1.0 200 OK" and "connection" not in old and again == body
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

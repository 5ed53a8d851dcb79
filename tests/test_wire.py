"""The wire structs: what a timeline page decodes to and what the cached body carries."""

from __future__ import annotations

import msgspec
import pytest

from engine import wire

POST_HEAD = (
    b'{"id":"p1","userId":"u1","content":"hi","contentType":"image","visibility":"public",'
    b'"createdAt":"2026-11-30T10:00:00.000Z","updatedAt":"2026-11-30T10:00:00.000Z"'
)


def page(*fields: bytes) -> bytes:
    return b'{"posts":[' + POST_HEAD + b"".join(b"," + field for field in fields) + b"}]}"


def cached(body: bytes) -> bytes:
    posts = wire.timeline_page_decoder.decode(body).posts
    return wire.cached_body(posts, 1, "hot", cached=False)


def test_media_and_metadata_are_stored_byte_for_byte() -> None:
    # Fields the cache does not know, a float's spelling, escapes and inner spaces all survive:
    # the cache carries the timeline service's free-form JSON without rewriting it.
    media = b'[{"type":"image","url":"https://m.example/a.jpg","ratio":1.50,"alt":"caf\\u00e9"}]'
    metadata = b'{"tags": ["a", "b"], "geo": {"lat": 52.520008, "lon": 13.40}, "pinned": true}'
    body = cached(page(b'"media":' + media, b'"metadata":' + metadata))
    assert b'"media":' + media + b"," in body
    assert b'"metadata":' + metadata + b"," in body
    post = msgspec.json.decode(body)["data"]["posts"][0]
    assert post["media"][0]["alt"] == "café" and post["metadata"]["geo"]["lat"] == 52.520008


def test_absent_media_and_metadata_are_stored_empty() -> None:
    post = msgspec.json.decode(cached(page()))["data"]["posts"][0]
    assert post["media"] == [] and post["metadata"] == {}


@pytest.mark.parametrize(
    "field",
    [
        b'"media":[{"type":"image",}]',  # a trailing comma
        b'"media":[{"type":"image"}',  # unclosed
        b'"metadata":{"tags":[a]}',  # a bare word
        b'"metadata":{tags:[]}',  # an unquoted key
    ],
)
def test_malformed_json_inside_media_or_metadata_is_a_decode_error(field: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        wire.timeline_page_decoder.decode(page(field))


def test_typed_fields_are_still_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="likeCount"):
        wire.timeline_page_decoder.decode(page(b'"likeCount":"many"'))
    with pytest.raises(msgspec.ValidationError, match="content"):
        wire.timeline_page_decoder.decode(page().replace(b'"content":"hi",', b""))

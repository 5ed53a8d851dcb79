"""Wire structs: what the upstreams send us and what we store and serve.

Encoders and decoders are built once at import. The cached entry is the ready response body
of GET /api/cache/{userId}, so the read path serves stored bytes without parsing them.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Post(msgspec.Struct, kw_only=True, gc=False):
    """One post, with the exprsn-timeline fields (the bluesky ones may be null).

    gc=False: decoded posts cannot form reference cycles, and leaving 100 of them per job out
    of the cyclic GC cut decoding by about 15% (tuning.md).

    `media` (an array) and `metadata` (an object) are the timeline service's free-form JSON,
    which the cache carries and never reads: they are kept as msgspec.Raw, checked to be
    well-formed JSON and stored byte for byte as the service sent them. Decoding them into
    lists and dicts cost a third of the decode and three GC-tracked containers per post,
    which set off a young collection every job or two in a worker (tuning.md, "Garbage
    collection in the workers").
    """

    id: str
    userId: str
    content: str
    contentType: str
    media: msgspec.Raw = msgspec.Raw(b"[]")
    visibility: str
    likeCount: int = 0
    commentCount: int = 0
    repostCount: int = 0
    metadata: msgspec.Raw = msgspec.Raw(b"{}")
    blueskyUri: str | None = None
    blueskyDid: str | None = None
    blueskyRkey: str | None = None
    syncedToBluesky: bool = False
    deleted: bool = False
    createdAt: str
    updatedAt: str


class Pagination(msgspec.Struct):
    page: int
    limit: int
    hasMore: bool


class TimelinePage(msgspec.Struct):
    """The timeline service's answer to GET {TIMELINE_PATH}?limit=N (unknown fields ignored)."""

    posts: list[Post]
    success: bool = True
    userId: str | None = None
    pagination: Pagination | None = None


class TimelineData(msgspec.Struct):
    posts: list[Post]
    fetchedAt: int
    postsCount: int
    tier: str


class CacheMeta(msgspec.Struct):
    cached: bool
    tier: str
    fetchedAt: int


class CachedTimeline(msgspec.Struct):
    """The response body of GET /api/cache/{userId}; stored as is."""

    success: bool
    data: TimelineData
    meta: CacheMeta


class Permissions(msgspec.Struct, omit_defaults=True):
    read: bool = False
    write: bool = False
    append: bool = False
    delete: bool = False
    update: bool = False


class TokenInfo(msgspec.Struct, omit_defaults=True):
    expiresAt: int | None = None


class Validation(msgspec.Struct, kw_only=True):
    """The CA's answer to POST /api/tokens/validate."""

    valid: bool = False
    permissions: Permissions = msgspec.field(default_factory=Permissions)
    userId: str | None = None
    tokenData: dict[str, Any] | None = None
    token: TokenInfo | None = None
    error: str | None = None
    message: str | None = None


class IssuedToken(msgspec.Struct):
    """The CA's answer to a service-token request."""

    token: str
    expiresAt: int | None = None


class FailedJob(msgspec.Struct):
    """An entry of the failed-jobs list (GET /api/prefetch/queue/failed)."""

    id: str
    userId: str
    priority: str
    failedReason: str
    attempts: int
    timestamp: int


json_encoder = msgspec.json.Encoder()
timeline_page_decoder = msgspec.json.Decoder(TimelinePage)
validation_decoder = msgspec.json.Decoder(Validation)
issued_token_decoder = msgspec.json.Decoder(IssuedToken)
failed_job_decoder = msgspec.json.Decoder(FailedJob)


def cached_body(posts: list[Post], fetched_at: int, tier: str, *, cached: bool) -> bytes:
    """Encode the GET /api/cache/{userId} body for these posts."""
    return json_encoder.encode(
        CachedTimeline(
            success=True,
            data=TimelineData(posts=posts, fetchedAt=fetched_at, postsCount=len(posts), tier=tier),
            meta=CacheMeta(cached=cached, tier=tier, fetchedAt=fetched_at),
        )
    )

"""Conditional reads of GET /api/cache/{userId}: ETag, Cache-Control and 304, over real HTTP.

The entity tag and the expiry are stamped into the entry when it is encoded, so these tests
also check that the stamp survives the trip through Redis and that every representation (the
gzip bytes as stored, the plain JSON, the read-through answer) names the same entry.
"""

from __future__ import annotations

import gzip
import re

import aiohttp
import pytest

from api.appkeys import RUNTIME
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from tests.conftest import ApiClient, Reply, eventually, new_user, serve_api

pytestmark = pytest.mark.timeout(30)

TAG = re.compile(r'"([0-9a-f]{16})(-gzip|-rt)?"')
MAX_AGE = re.compile(r"private, max-age=(\d+)")


def tag_of(reply: Reply) -> tuple[str, str]:
    """(the entry's tag, the representation's suffix) of a reply's ETag."""
    found = TAG.fullmatch(reply.headers["ETag"])
    assert found, reply.headers["ETag"]
    return found.group(1), found.group(2) or ""


def max_age(reply: Reply) -> int:
    found = MAX_AGE.fullmatch(reply.headers["Cache-Control"])
    assert found, reply.headers["Cache-Control"]
    return int(found.group(1))


async def test_a_hit_has_a_strong_etag_fixed_at_store_and_the_ttl_left(api: ApiClient) -> None:
    user = new_user()
    assert (
        await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    ).status == 200
    first = await api.call("GET", f"/api/cache/{user}", headers={"Accept-Encoding": "identity"})
    again = await api.call("GET", f"/api/cache/{user}", headers={"Accept-Encoding": "identity"})
    assert first.status == again.status == 200
    tag, suffix = tag_of(first)
    assert suffix == "" and not first.headers["ETag"].startswith("W/")
    assert tag_of(again) == (tag, "")
    assert first.headers["Vary"] == "Accept-Encoding"
    # max-age is the entry's own remaining lifetime, never more than Redis keeps it.
    status = (await api.call("GET", f"/api/cache/status/{user}")).body["data"]
    assert status["tier"] == "hot"
    assert status["expiresIn"] // 1000 - 2 <= max_age(again) <= status["expiresIn"] // 1000 + 1
    assert max_age(again) <= api.settings.hot_ttl_ms // 1000

    # A new fetch is a new entry: a new tag, though the posts did not change.
    forced = await api.app[RUNTIME].prefetcher.prefetch(user, "high", force=True)
    assert forced.stored
    renewed = await api.call("GET", f"/api/cache/{user}")
    assert renewed.status == 200 and tag_of(renewed)[0] != tag


async def test_if_none_match_with_the_current_tag_is_304_without_a_body(api: ApiClient) -> None:
    user = new_user()
    await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    full = await api.call("GET", f"/api/cache/{user}")
    tag, _ = tag_of(full)
    for sent in (full.headers["ETag"], f'W/"{tag}"', f'"0123456789abcdef", "{tag}-gzip"', "*"):
        reply = await api.call("GET", f"/api/cache/{user}", headers={"If-None-Match": sent})
        assert reply.status == 304, sent
        assert reply.raw == b""
        assert "Content-Type" not in reply.headers
        assert tag_of(reply)[0] == tag and max_age(reply) > 0
        assert len(reply.headers["X-Request-Id"]) >= 8
    stale = await api.call(
        "GET", f"/api/cache/{user}", headers={"If-None-Match": '"0123456789abcdef"'}
    )
    assert stale.status == 200 and stale.body["data"]["postsCount"] == 100


async def test_the_gzip_representation_has_its_own_tag_and_revalidates(api: ApiClient) -> None:
    user = new_user()
    await api.call("GET", f"/api/cache/{user}")  # read-through stores it in warm
    auth = {"Authorization": "Bearer sandbox-service", "Accept-Encoding": "gzip"}
    url = f"{api.url}/api/cache/{user}"
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(url, headers=auth) as rsp:
            assert rsp.status == 200 and rsp.headers["Content-Encoding"] == "gzip"
            etag = rsp.headers["ETag"]
            body = await rsp.read()
        # The stamp rides in the gzip header's FNAME field: still one standard gzip member.
        assert body[:4] == b"\x1f\x8b\x08\x08"
        assert gzip.decompress(body).startswith(b'{"success":true')
        assert re.fullmatch(r'"[0-9a-f]{16}-gzip"', etag)
        async with raw.get(url, headers={**auth, "If-None-Match": etag}) as rsp:
            assert rsp.status == 304 and await rsp.read() == b""
            assert rsp.headers["ETag"] == etag
            assert "Content-Encoding" not in rsp.headers


async def test_a_read_through_answer_names_the_entry_it_stored(api: ApiClient) -> None:
    user = new_user()
    fetched = await api.call("GET", f"/api/cache/{user}")
    assert fetched.status == 200 and fetched.body["meta"]["cached"] is False
    tag, suffix = tag_of(fetched)
    assert suffix == "-rt"
    warm_ttl_s = api.settings.warm_ttl_ms // 1000
    assert warm_ttl_s - 5 <= max_age(fetched) <= warm_ttl_s
    hit = await api.call("GET", f"/api/cache/{user}")
    assert hit.body["meta"]["cached"] is True and tag_of(hit)[0] == tag
    revalidated = await api.call(
        "GET", f"/api/cache/{user}", headers={"If-None-Match": fetched.headers["ETag"]}
    )
    assert revalidated.status == 304


async def test_after_an_invalidation_the_old_tag_gets_the_new_entry(api: ApiClient) -> None:
    user = new_user()
    old = await api.call("GET", f"/api/cache/{user}")
    assert (await api.call("DELETE", f"/api/cache/{user}/timeline")).status == 200
    sent = {"If-None-Match": old.headers["ETag"]}
    gone = await api.call("GET", f"/api/cache/{user}?cacheOnly=true", headers=sent)
    assert gone.status == 404 and gone.body["error"] == "NOT_FOUND"
    again = await api.call("GET", f"/api/cache/{user}", headers=sent)
    assert again.status == 200 and again.body["meta"]["cached"] is False
    assert tag_of(again)[0] != tag_of(old)[0]


async def test_304_counts_as_a_hit_and_as_activity(api: ApiClient) -> None:
    user = new_user()
    await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    etag = (await api.call("GET", f"/api/cache/{user}")).headers["ETag"]
    sent = {"If-None-Match": etag}
    assert (await api.call("GET", f"/api/cache/{user}", headers=sent)).status == 304

    async def counted() -> bool:
        metrics = (await api.call("GET", "/api/prefetch/metrics")).body["data"]["cache"]
        return metrics["hotHits"] == 2 and metrics["misses"] == 0

    await eventually(counted)
    activity = api.app[RUNTIME].redis["metrics"]

    async def recorded() -> bool:
        index = keys.activity_index(keys.shard_of(user))
        return await activity.execute("ZSCORE", index, user) is not None

    await eventually(recorded)


async def test_plain_storage_is_stamped_too(settings: Settings) -> None:
    async with serve_api(settings.with_overrides(cache_compression="none")) as api:
        user = new_user()
        await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
        hit = await api.call("GET", f"/api/cache/{user}", headers={"Accept-Encoding": "gzip"})
        assert hit.status == 200 and hit.raw.startswith(b'{"success":true')
        assert "Content-Encoding" not in hit.headers
        assert tag_of(hit)[1] == "" and max_age(hit) > 0
        sent = {"If-None-Match": hit.headers["ETag"]}
        assert (await api.call("GET", f"/api/cache/{user}", headers=sent)).status == 304


async def test_an_entry_stored_without_a_stamp_is_served_without_validators(
    api: ApiClient, redis_roles: dict[str, FastRedis]
) -> None:
    """Entries written before stamps existed (a rolling upgrade) are still served."""
    user = new_user()
    plain = b'{"success":true,"data":{"posts":[],"fetchedAt":1,"postsCount":0,"tier":"warm"},'
    plain += b'"meta":{"cached":true,"tier":"warm","fetchedAt":1}}'
    for stored in (plain, gzip.compress(plain, mtime=0)):
        await redis_roles["warm"].execute("SET", keys.timeline("warm", user), stored, "PX", 60_000)
        sent = {"If-None-Match": '"0123456789abcdef"'}
        reply = await api.call("GET", f"/api/cache/{user}", headers=sent)
        assert reply.status == 200 and reply.body["data"]["postsCount"] == 0
        assert "ETag" not in reply.headers
        assert reply.headers["Cache-Control"] == "private, max-age=0"

"""The cache on a real Redis Cluster (REDIS_CLUSTER_MODE=true), the queue on a node of its own.

A cluster of three masters, each with a replica, is started once for the session
(tests/redis_servers.py) and flushed before each test; the queue node likewise. Reads,
writes, the invalidation race guard, activity, usefulness and metrics go through the API; a
real `prefetch worker` runs jobs and the strategy scheduler's tick against the Cluster. A
slot migration and a manual failover each happen while reads run: every read must answer
200. The cluster client also speaks TLS with ACL users to a TLS-only Cluster.

Marked `cluster` (slow: `make test-cluster`, and a step of .ci/run). A cluster that cannot
start fails these tests; none is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis

from engine import wire
from engine.errors import RedisReplyError, RedisUnavailable
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import Ticket, TimelineCache
from engine.store.cluster import ClusterRedis
from engine.store.fastredis import Script
from sandbox import SandboxServer, SandboxSettings, generate_posts
from tests.conftest import ApiClient, closed_port, serve_api
from tests.engine_support import EngineProcess, clean_env, error_lines, spawn, wait_for
from tests.redis_servers import (
    APP_PASSWORD,
    READER_PASSWORD,
    READER_USER,
    LocalCluster,
    SingleNode,
    make_certificates,
    tls_url,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

READERS = 8  # concurrent readers while the topology changes


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Three masters with a replica each, for the whole session."""
    with LocalCluster(masters=3, replicas=1) as started:
        yield started


@pytest.fixture(scope="session")
def queue_node() -> Iterator[SingleNode]:
    """The job queue's own single node (BROKER_URL)."""
    with SingleNode() as node:
        yield node


def _flush(cluster: LocalCluster, queue_node: SingleNode) -> None:
    cluster.wait_healthy()
    for node in cluster.live_nodes():
        if node.client().info("replication").get("role") == "master":
            node.client().flushall()
    queue_node.client().flushall()


@pytest_asyncio.fixture
async def settings(
    cluster: LocalCluster, queue_node: SingleNode, tmp_path: Path
) -> AsyncIterator[Settings]:
    """Cluster-mode settings over the sandbox; both Redis locations flushed."""
    _flush(cluster, queue_node)
    base = Settings().with_overrides(
        env="test",
        redis_url=cluster.url,
        redis_configured=True,
        redis_cluster_mode=True,
        broker_url=queue_node.url(),
        db_queue=0,
        timeline_url="http://127.0.0.1:0",
        ca_url="http://127.0.0.1:0",
        service_token="sandbox-service",
        prefetch_timeout_ms=3000,
        metrics_dir="",
    )
    async with SandboxServer(base, SandboxSettings()) as sandbox:
        yield sandbox.settings_for_clients()


@pytest_asyncio.fixture
async def api(settings: Settings) -> AsyncIterator[ApiClient]:
    async with serve_api(settings) as client:
        yield client


@pytest.fixture
def seen(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    """redis-py's cluster client, to check what landed where."""
    client = redis.RedisCluster.from_url(cluster.url)
    yield client
    client.close()


def new_user() -> str:
    return str(uuid.uuid4())


def users_of_one_shard(count: int) -> list[str]:
    """`count` users that share a key shard (so their keys share a Cluster slot)."""
    first = new_user()
    found = [first]
    while len(found) < count:
        user = new_user()
        if keys.shard_of(user) == keys.shard_of(first):
            found.append(user)
    return found


# --- reads, writes, invalidation ---------------------------------------------------------------


async def test_reads_writes_and_invalidation_go_to_the_cluster(
    api: ApiClient, settings: Settings, seen: redis.RedisCluster, queue_node: SingleNode
) -> None:
    user = new_user()
    first = await api.call("GET", f"/api/cache/{user}")
    assert first.status == 200 and first.body["meta"]["cached"] is False
    second = await api.call("GET", f"/api/cache/{user}")
    assert second.status == 200 and second.body["meta"] == {
        "cached": True,
        "tier": "warm",
        "fetchedAt": second.body["meta"]["fetchedAt"],
    }
    hot = await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    assert hot.status == 200 and hot.body["data"]["tier"] == "hot"
    status = await api.call("GET", f"/api/cache/status/{user}")
    assert status.body["data"]["tier"] == "hot" and status.body["data"]["expiresIn"] > 0

    # On the Cluster, in the slot of the user's shard, beside the shard's indexes.
    shard = keys.shard_of(user)
    together = [
        keys.timeline("hot", user),
        keys.generation("hot", user),
        keys.expiry_index("hot", shard),
        keys.unread_index("hot", shard),
    ]
    assert seen.exists(keys.timeline("hot", user), keys.timeline("warm", user)) == 2
    assert len({seen.keyslot(key) for key in together}) == 1
    assert seen.zscore(keys.expiry_index("hot", shard), user) is not None
    # Nothing of the cache on the queue's node.
    assert queue_node.client().keys("prefetch:hot:*") == []

    deleted = await api.call("DELETE", f"/api/cache/{user}/timeline")
    assert deleted.status == 200
    assert (await api.call("GET", f"/api/cache/{user}?cacheOnly=true")).status == 404
    assert (await api.call("GET", f"/api/cache/status/{user}")).body["data"]["cached"] is False
    assert seen.exists(keys.timeline("hot", user), keys.timeline("warm", user)) == 0
    assert int(seen.get(keys.generation("warm", user))) == 1


async def test_an_invalidation_wins_over_a_fetch_in_flight_on_the_cluster(
    settings: Settings,
) -> None:
    client = ClusterRedis(settings.redis_url)
    cache = TimelineCache(settings, client, client)
    try:
        user, other = new_user(), new_user()
        late = await cache.begin(user, "warm", origin="schedule")
        await cache.invalidate(user)  # arrives while the fetch is in flight
        assert not await cache.store("warm", user, b'{"late":1}', late)
        assert await cache.read(user) is None

        ticket = await cache.begin(other, "warm", origin="schedule")  # control: no invalidation
        assert await cache.store("warm", other, b'{"ok":1}', ticket)
        assert await cache.read(other) == ("warm", b'{"ok":1}')
        fresh = await cache.begin(user, "warm")  # after the invalidation, stores land again
        assert await cache.store("warm", user, b'{"new":1}', fresh)
    finally:
        await client.close()


async def test_activity_usefulness_metrics_and_health_on_the_cluster(
    api: ApiClient, settings: Settings, seen: redis.RedisCluster
) -> None:
    users = [new_user() for _ in range(6)]
    for user in users:
        done = await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
        assert done.status == 200
    for user in users:
        assert (await api.call("GET", f"/api/cache/{user}")).body["meta"]["tier"] == "hot"

    def recorded() -> bool:  # the API's activity flush ran its per-shard scripts
        return all(seen.zscore(keys.activity_index(keys.shard_of(u)), u) is not None for u in users)

    await wait_for(recorded, 10, "activity recorded on the cluster")

    async def counted() -> Any:
        reply = await api.call("GET", "/api/prefetch/metrics")
        data = reply.body["data"]
        return data if data["usefulness"]["readBeforeExpiry"] >= len(users) else None

    data = await wait_for(counted, 10, "reads of prefetched entries counted")
    assert data["cache"]["hotHits"] >= len(users)
    assert data["prefetch"]["byOrigin"]["immediate"] >= len(users)
    for user in users:  # the unread marks were cleared by consume.lua on the cluster
        shard = keys.shard_of(user)
        assert seen.hget(keys.unread_origin("hot", shard), user) is None

    counts = await api.call("GET", "/health/cache")
    assert counts.status == 200
    assert counts.body["hot"] == {**counts.body["hot"], "entries": len(users), "exact": True}
    health = await api.call("GET", "/health/redis")
    assert health.status == 200 and health.body["hotCache"]["keys"] > len(users)
    assert health.body["hotCache"]["memory"].endswith("B")
    assert (await api.call("GET", "/health/ready")).status == 200


async def test_every_script_keeps_to_one_slot_on_the_cluster(settings: Settings) -> None:
    """The Cluster refuses a script whose keys span slots (CROSSSLOT): the probe shows it
    would, and the service's own scripts ran above without it."""
    client = ClusterRedis(settings.redis_url)
    try:
        spanning = Script("return redis.call('GET', KEYS[1])")
        with pytest.raises(RedisReplyError, match=r"^CROSSSLOT"):
            await client.evalsha_or_eval(spanning, ["prefetch:a", "prefetch:b"], [])
    finally:
        await client.close()


# --- a worker and the strategy scheduler on the cluster ----------------------------------------


@contextlib.asynccontextmanager
async def worker(settings: Settings, tmp_path: Path) -> AsyncIterator[EngineProcess]:
    env = clean_env(
        REDIS_CLUSTER_MODE="true",
        REDIS_URL=settings.redis_url,
        BROKER_URL=settings.broker_url,
        REDIS_DB_QUEUE="0",
        TIMELINE_SERVICE_URL=settings.timeline_url,
        CA_URL=settings.ca_url,
        SERVICE_CERTIFICATE_TOKEN="sandbox-service",
        PREFETCH_WORKER_COUNT="1",
        PREFETCH_METRICS_DIR=str(tmp_path / "metrics"),
        ENABLE_ACTIVITY_BASED="true",
        ENABLE_PREDICTIVE="true",
        ACTIVITY_CHECK_INTERVAL="1000",
        SCHEDULER_LEASE_TTL="3000",
        LOG_LEVEL="info",
    )
    process = spawn("worker", env, tmp_path / "worker.log")
    try:
        yield process
    finally:
        process.kill()
        print(process.log_tail())  # shown when the test failed


async def test_a_worker_and_the_scheduler_fill_the_cluster(
    api: ApiClient, settings: Settings, seen: redis.RedisCluster, tmp_path: Path
) -> None:
    async with worker(settings, tmp_path) as process:
        scheduled = new_user()
        reply = await api.call(
            "POST", f"/api/prefetch/schedule/{scheduled}", json={"priority": "high"}
        )
        assert reply.status == 202
        await wait_for(lambda: seen.exists(keys.timeline("hot", scheduled)), 30, "the job's entry")

        active = [new_user() for _ in range(12)]
        recorded = await api.call("POST", "/api/activity", json={"userIds": active})
        assert recorded.status == 202

        def all_cached() -> bool:
            tiers = ("hot", "warm")
            return all(seen.exists(*(keys.timeline(t, u) for t in tiers)) for u in active)

        await wait_for(all_cached, 45, "the scheduler's batches to land on the cluster")

        async def reported() -> Any:  # the leader reports once its tick (and sweep) ended
            stats = await api.call("GET", "/api/prefetch/queue/stats")
            return stats.body["data"]["scheduler"]["lastTick"]

        tick = await wait_for(reported, 20, "the leader's tick report on the queue node")
        assert tick["durationMs"] >= 0 and "candidates.activity" in tick
        assert error_lines(process.log()) == []


# --- the topology changes while reads run --------------------------------------------------------


async def _stored(settings: Settings, users: list[str]) -> None:
    client = ClusterRedis(settings.redis_url)
    cache = TimelineCache(settings, client, client)
    try:
        for user in users:
            for tier in ("hot", "warm"):
                # A real entry: every answer the tests read is checked against the contract.
                body = wire.cached_body(
                    generate_posts(user, 5), int(time.time() * 1000), tier, cached=True
                )
                assert await cache.store(tier, user, cache.encode(body, tier), Ticket(False, b""))
    finally:
        await client.close()


async def _read_while(api: ApiClient, users: list[str], change: Any) -> tuple[list[int], int]:
    """Read `users` (cacheOnly) from READERS coroutines until `change` (a blocking callable,
    run in a thread) returns; the statuses, and how many reads started during the change."""
    statuses: list[int] = []
    failures: list[str] = []
    during = 0
    done = asyncio.Event()

    async def reader(offset: int) -> None:
        nonlocal during
        i = offset
        while not done.is_set():
            user = users[i % len(users)]
            i += 1
            during += 1
            reply = await api.call("GET", f"/api/cache/{user}?cacheOnly=true")
            statuses.append(reply.status)
            if reply.status != 200:
                failures.append(f"{reply.status} {reply.body}")

    readers = [asyncio.create_task(reader(i)) for i in range(READERS)]
    try:
        await asyncio.sleep(0.2)  # reads under way before the change begins
        await asyncio.to_thread(change)
    finally:
        done.set()
        await asyncio.gather(*readers)
    for failure in sorted(set(failures)):
        print(failures.count(failure), "x", failure)  # shown when the test fails
    return statuses, during


async def test_every_read_answers_while_a_slot_migrates(
    api: ApiClient, settings: Settings, cluster: LocalCluster, seen: redis.RedisCluster
) -> None:
    users = users_of_one_shard(12)
    await _stored(settings, users)
    slot = seen.keyslot(keys.timeline("hot", users[0]))
    source = cluster.node_of_slot(slot)
    target = next(node for node in cluster.masters_now() if node.port != source.port)
    moved: list[int] = []

    statuses, during = await _read_while(
        api, users, lambda: moved.append(cluster.migrate_slot(slot, target, batch=1))
    )
    assert moved[0] >= 2 * len(users)  # entries, generations aside: both tiers' timelines
    assert cluster.node_of_slot(slot).port == target.port
    assert during >= READERS and len(statuses) == during
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} reads answered 200"


async def test_every_read_answers_through_a_failover(
    api: ApiClient, settings: Settings, cluster: LocalCluster, seen: redis.RedisCluster
) -> None:
    users = users_of_one_shard(12)
    await _stored(settings, users)
    slot = seen.keyslot(keys.timeline("hot", users[0]))
    master = cluster.node_of_slot(slot)
    promoted: list[int] = []

    statuses, during = await _read_while(
        api, users, lambda: promoted.append(cluster.failover(master).port)
    )
    assert cluster.node_of_slot(slot).port == promoted[0] != master.port
    assert during >= READERS and len(statuses) == during
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} reads answered 200"
    # And writes land on the new master.
    assert (await api.call("POST", f"/api/prefetch/immediate/{users[0]}", json={})).status == 200


# --- failures ---------------------------------------------------------------------------------


async def test_a_cluster_out_of_reach_is_unavailable_not_a_crash(settings: Settings) -> None:
    down = settings.with_overrides(redis_url=f"redis://127.0.0.1:{closed_port()}")
    client = ClusterRedis(down.redis_url, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await client.get("prefetch:hot:timeline:x")
    with pytest.raises(RedisUnavailable):  # held off: fails at once, no second connect
        await client.pipeline([("GET", "a"), ("GET", "b")])
    assert time.monotonic() - started < 5
    await client.close()

    async with serve_api(down) as api:
        read = await api.call("GET", f"/api/cache/{new_user()}")
        assert read.status == 503 and read.body["error"] == "REDIS_UNAVAILABLE"
        assert (await api.call("GET", "/health/ready")).status == 503
        assert (await api.call("GET", "/health/live")).status == 200


# --- managed: a TLS-only Cluster with ACL users --------------------------------------------------


@pytest.fixture(scope="module")
def secure_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3, secure=True) as started:
        yield started


async def test_the_cluster_client_speaks_tls_as_an_acl_user(
    secure_cluster: LocalCluster, tmp_path: Path
) -> None:
    certs = secure_cluster.certs
    assert certs is not None
    port = secure_cluster.nodes[0].port
    settings = Settings().with_overrides(redis_url=secure_cluster.url, redis_cluster_mode=True)
    assert "%40" in secure_cluster.url  # the password is URL-quoted
    client = ClusterRedis(tls_url(port, certs, client_cert=True))
    cache = TimelineCache(settings, client, client)
    try:
        user = new_user()
        assert await cache.store("hot", user, b"{}", Ticket(False, b""))
        assert await cache.read(user) == ("hot", b"{}")
        assert await client.pipeline([("GET", keys.timeline("hot", user)), ("GET", "x")]) == [
            b"{}",
            None,
        ]
    finally:
        await client.close()

    reader = ClusterRedis(tls_url(port, certs, user=READER_USER, password=READER_PASSWORD))
    try:
        assert await reader.get(keys.timeline("hot", user)) == b"{}"
        with pytest.raises(RedisReplyError, match=r"^NOPERM"):
            await reader.set("prefetch:x", "1")
    finally:
        await reader.close()

    stranger = make_certificates(tmp_path)
    for refused in (
        tls_url(port, certs, password=APP_PASSWORD + "x"),  # wrong password
        tls_url(port, certs, ca=stranger.ca),  # a CA that did not sign the servers
        secure_cluster.url.replace("rediss://", "redis://").split("?")[0],  # no TLS at all
    ):
        attempt = ClusterRedis(refused, connect_timeout=1)
        with pytest.raises(RedisUnavailable):
            await attempt.get("prefetch:x")
        await attempt.close()
    unverified = ClusterRedis(tls_url(port, certs, verify=False))
    try:
        assert await unverified.get(keys.timeline("hot", user)) == b"{}"
    finally:
        await unverified.close()

"""Our scripts write Dramatiq's Redis layout exactly as Dramatiq does; its internals are there.

engine/broker/dramatiq_layout.py writes Dramatiq's layout with scripts of its own (to make an
enqueue atomic with a dedup check, or an ack atomic with the job's outcome). Each test does
one thing both ways, Dramatiq's (`RedisBroker.enqueue`, its dispatch commands) in one DB and
ours in another, and compares the two DBs' whole state, the random ids aside. The last tests
check the Dramatiq internals that engine/broker/dramatiq_worker.py depends on, and the
broker's connection pool under more threads than connections.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import pytest_asyncio
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.worker import Worker

from engine.broker import dramatiq_layout as layout
from engine.broker.dramatiq_worker import WorkItem
from engine.broker.jobs import JobQueue, job_kwargs
from engine.broker.worker import broker_pool
from engine.settings import Settings
from engine.store.fastredis import FastRedis
from tests.engine_support import DB_HOT, DB_QUEUE, LOCK_KEY, Engine, user

OURS, DRAMATIQ = DB_QUEUE, DB_HOT  # both flushed by the harness, which holds the test lock
WORKER_ID = "layout-test-worker"
_ETA = re.compile(rb'"eta":\d+')


@pytest_asyncio.fixture
async def dbs(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[FastRedis, RedisBroker]]:
    """Our client on one DB, a plain Dramatiq RedisBroker on the other."""
    async with Engine.open(tmp_path, redis_url) as engine:
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            client=redis.Redis.from_url(redis_url, db=DRAMATIQ),
            namespace=layout.NAMESPACE,
            middleware=[],
        )
        broker.broker_id = WORKER_ID
        yield engine.queue, broker
        broker.close()


def state(url: str, db: int, ids: list[str]) -> dict[bytes, Any]:
    """Every key of a DB and its value; ids become <id0>, <id1>... and etas 0."""
    client = redis.Redis.from_url(url, db=db)

    def norm(raw: bytes) -> bytes:
        for n, rid in enumerate(ids):
            raw = raw.replace(rid.encode(), f"<id{n}>".encode())
        return _ETA.sub(b'"eta":0', raw)

    found: dict[bytes, Any] = {}
    try:
        for key in client.keys("*"):
            if key in (LOCK_KEY.encode(), layout.HEARTBEATS.encode()):
                continue  # the test lock; Dramatiq's dispatch heartbeats on every call
            kind = client.type(key)
            value: Any
            if kind == b"list":
                value = [norm(v) for v in client.lrange(key, 0, -1)]
            elif kind == b"hash":
                value = {norm(k): norm(v) for k, v in client.hgetall(key).items()}
            elif kind == b"set":
                value = sorted(norm(v) for v in client.smembers(key))
            elif kind == b"zset":
                value = sorted(norm(v) for v in client.zrange(key, 0, -1))  # scores are times
            else:
                value = norm(client.get(key) or b"")
            found[norm(key)] = value
    finally:
        client.close()
    return found


def broker_on_ours(url: str) -> layout.PrefetchBroker:
    """Dramatiq's broker (ours: it writes as RedisBroker does) on our DB, as the worker."""
    broker = layout.PrefetchBroker(  # type: ignore[no-untyped-call]
        client=redis.Redis.from_url(url, db=OURS),
        namespace=layout.NAMESPACE,
        middleware=[],
    )
    broker.broker_id = WORKER_ID
    return broker


def message(priority: str = "medium") -> dramatiq.Message[Any]:
    uid = user()
    return dramatiq.Message(
        queue_name=priority,
        actor_name=f"prefetch_{priority}",
        args=(uid, f"prefetch:{uid}:1"),
        kwargs=job_kwargs("schedule", False),
        options={},
    )


@pytest.mark.parametrize("delay_ms", [0, 5_000])
async def test_push_writes_what_dramatiqs_enqueue_writes(
    dbs: tuple[FastRedis, RedisBroker], redis_url: str, delay_ms: int
) -> None:
    ours, dramatiq_broker = dbs
    msg = message()
    sent = dramatiq_broker.enqueue(msg, delay=delay_ms or None)
    outgoing = layout.encode(layout.encoder_broker(), msg, delay_ms)
    assert await layout.push(ours, outgoing)
    assert outgoing.queue == sent.queue_name
    theirs_state = state(redis_url, DRAMATIQ, [sent.options["redis_message_id"]])
    assert theirs_state, "Dramatiq wrote something"
    assert state(redis_url, OURS, [outgoing.redis_id]) == theirs_state


@pytest.mark.parametrize("delay_ms", [0, 5_000])
async def test_schedule_writes_the_queue_as_dramatiqs_enqueue_does(
    dbs: tuple[FastRedis, RedisBroker], redis_url: str, delay_ms: int
) -> None:
    ours, dramatiq_broker = dbs
    scheduled = await JobQueue(ours).schedule(user(), "low", delay_ms)
    queue = "low.DQ" if delay_ms else "low"
    ours_id, data = await ours.execute("HGETALL", layout.messages_key(queue))
    written = dramatiq.Message.decode(data)
    assert written.args[1] == scheduled.jobId
    # The same message, before the broker gave it an id, through Dramatiq's own enqueue.
    bare = written.copy(queue_name="low")
    bare.options.clear()
    sent = dramatiq_broker.enqueue(bare, delay=delay_ms or None)
    ours_state = {
        k: v
        for k, v in state(redis_url, OURS, [ours_id.decode()]).items()
        if not k.startswith(b"prefetch:jobs:pending:")
    }
    assert ours_state == state(redis_url, DRAMATIQ, [sent.options["redis_message_id"]])


async def test_settle_acks_nacks_and_hands_back_as_dramatiqs_dispatch_does(
    dbs: tuple[FastRedis, RedisBroker], redis_url: str
) -> None:
    ours, dramatiq_broker = dbs
    ours_broker = broker_on_ours(redis_url)
    msgs = [message() for _ in range(3)]
    ids: dict[int, list[str]] = {}
    for db, broker in ((OURS, ours_broker), (DRAMATIQ, dramatiq_broker)):
        ids[db] = [broker.enqueue(m).options["redis_message_id"] for m in msgs]
        assert len(broker.do_fetch("medium", 10)) == 3
    dramatiq_broker.do_ack("medium", ids[DRAMATIQ][0])
    dramatiq_broker.do_nack("medium", ids[DRAMATIQ][1])
    dramatiq_broker.do_requeue("medium", ids[DRAMATIQ][2])
    groups = []
    for verb, rid in zip(("ack", "nack", "back"), ids[OURS], strict=True):
        groups += layout.settle_group(verb, "medium", rid, None)
    assert await layout.settle(ours, WORKER_ID, groups, 50) == [True] * 3
    assert state(redis_url, OURS, ids[OURS]) == state(redis_url, DRAMATIQ, ids[DRAMATIQ])
    # Settled again (a duplicate delivery's late settle): nothing moves twice.
    assert await layout.settle(ours, WORKER_ID, groups, 50) == [False] * 3
    assert state(redis_url, OURS, ids[OURS]) == state(redis_url, DRAMATIQ, ids[DRAMATIQ])
    ours_broker.close()


async def test_fetch_moves_messages_as_dramatiqs_consumer_fetch_does(
    dbs: tuple[FastRedis, RedisBroker], redis_url: str
) -> None:
    ours, dramatiq_broker = dbs
    ours_broker = broker_on_ours(redis_url)
    msgs = [message() for _ in range(5)]
    ids: dict[int, list[str]] = {}
    replies: dict[int, list[Any]] = {}
    for db, broker in ((OURS, ours_broker), (DRAMATIQ, dramatiq_broker)):
        ids[db] = [broker.enqueue(m).options["redis_message_id"] for m in msgs]
    replies[DRAMATIQ] = dramatiq_broker.do_fetch("medium", 3)
    replies[OURS] = await layout.fetch(ours, ours_broker, "medium", 3)
    decoded = {
        db: [dramatiq.Message.decode(data).message_id for data in reply]
        for db, reply in replies.items()
    }
    assert decoded[OURS] == decoded[DRAMATIQ] == [m.message_id for m in msgs[:3]]
    assert state(redis_url, OURS, ids[OURS]) == state(redis_url, DRAMATIQ, ids[DRAMATIQ])
    # Its heartbeat, as Dramatiq's fetch beats it.
    beat = await ours.execute("ZSCORE", layout.HEARTBEATS, WORKER_ID)
    assert beat is not None
    ours_broker.close()


async def test_a_beat_writes_the_heartbeat_dramatiqs_dispatch_writes(
    dbs: tuple[FastRedis, RedisBroker], redis_url: str
) -> None:
    ours, dramatiq_broker = dbs
    ours_broker = broker_on_ours(redis_url)
    before = int(time.time() * 1000)
    dramatiq_broker.do_fetch("medium", 1)  # an empty queue: only the heartbeat is written
    await layout.beat(ours, ours_broker)
    theirs = redis.Redis.from_url(redis_url, db=DRAMATIQ).zrange(
        layout.HEARTBEATS, 0, -1, withscores=True
    )
    mine = await ours.execute("ZRANGE", layout.HEARTBEATS, 0, -1, "WITHSCORES")
    assert theirs[0][0] == mine[0] == WORKER_ID.encode()
    assert before <= int(mine[1]) <= int(time.time() * 1000)
    assert before <= int(theirs[0][1]) <= int(time.time() * 1000)
    ours_broker.close()


def test_fetch_passes_dispatch_what_dramatiqs_consumer_passes(redis_url: str) -> None:
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        client=redis.Redis.from_url(redis_url),
        namespace=layout.NAMESPACE,
        middleware=[],
        maintenance_chance=0,
    )
    broker.broker_id = WORKER_ID
    seen: list[list[Any]] = []
    source = broker.scripts["dispatch"].script
    broker.scripts["dispatch"] = lambda args, keys: seen.append([keys, args]) or []
    broker.do_fetch("medium", 7)
    (keys_, theirs), mine = seen[0], layout.fetch_args(broker, "medium", 7)
    assert keys_ == [layout.NAMESPACE]
    assert (source.decode() if isinstance(source, bytes) else source) == layout.DISPATCH.source
    # The same arguments, but for the time and for the unpack limit, which Dramatiq asks
    # Redis for (half of Lua's stack), and ours keeps below.
    assert [a for n, a in enumerate(theirs) if n not in (1, 7)] == [
        a for n, a in enumerate(mine) if n not in (1, 7)
    ]
    assert abs(int(theirs[1]) - int(mine[1])) < 60_000
    assert int(theirs[7]) >= layout.FETCH_CAP
    broker.close()


async def test_promote_moves_a_due_message_as_dramatiq_does_keeping_its_id(
    dbs: tuple[FastRedis, RedisBroker], redis_url: str
) -> None:
    ours, dramatiq_broker = dbs
    ours_broker = broker_on_ours(redis_url)
    msg = message()
    fetched = {}
    for db, broker in ((OURS, ours_broker), (DRAMATIQ, dramatiq_broker)):
        broker.enqueue(msg, delay=10)
        (data,) = broker.do_fetch("medium.DQ", 10)
        fetched[db] = dramatiq.Message.decode(data)
    # Dramatiq's ConsumerThread.handle_delayed_messages: a copy under a new id, then the ack.
    theirs = fetched[DRAMATIQ]
    ready = theirs.copy(queue_name="medium")
    del ready.options["eta"]
    moved = dramatiq_broker.enqueue(ready)
    dramatiq_broker.do_ack("medium.DQ", theirs.options["redis_message_id"])
    # Ours: one step, same id.
    mine = fetched[OURS]
    ready = mine.copy(queue_name="medium")
    del ready.options["eta"]
    rid = mine.options["redis_message_id"]
    reply = await ours.evalsha_or_eval(
        layout.PROMOTE, [layout.NAMESPACE], [WORKER_ID, "medium", rid, ready.encode()]
    )
    assert reply == 1
    assert state(redis_url, OURS, [rid]) == state(
        redis_url, DRAMATIQ, [moved.options["redis_message_id"]]
    )
    ours_broker.close()


def test_the_dramatiq_internals_the_executor_uses_are_there() -> None:
    assert dramatiq.__version__.startswith("2.2."), "re-check dramatiq_worker.py, then the pin"
    for name in ("_add_consumer", "consumers", "work_queue", "stop"):
        assert hasattr(Worker(RedisBroker(client=redis.Redis(), middleware=[])), name)  # type: ignore[no-untyped-call]
    proxy = MessageProxy(message())
    item = WorkItem(3, proxy)  # as the loop consumer builds them; WorkQueue reads both fields
    assert item.priority == 3 and item.message is proxy


def test_the_broker_pool_makes_a_burst_of_threads_wait_instead_of_failing(
    redis_url: str,
) -> None:
    pool = broker_pool(Settings().with_overrides(redis_url=redis_url, db_queue=DB_QUEUE))
    client = redis.Redis(connection_pool=pool)
    threads_count = pool.max_connections * 4
    errors: list[BaseException] = []

    def hold_a_connection() -> None:
        try:
            client.blpop(["layout-test:never"], timeout=0.2)  # holds its connection 0.2 s
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold_a_connection) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    client.close()
    print(f"redis-py {redis.__version__}: {threads_count} threads on {pool.max_connections}")
    assert errors == []

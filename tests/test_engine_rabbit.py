"""What only the RabbitMQ broker has: marks and messages on two servers, the fence's margin,
lost acknowledgements, the queue type, and the Dramatiq internals the settler relies on.

The broker-neutral behaviour (schedule, priorities, retries, dedup, failures, SIGKILL, SIGTERM)
runs on RabbitMQ too: the engine tests take the `broker_url` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import dramatiq
import pika
import pika.exceptions
import pytest
import pytest_asyncio
from dramatiq.brokers import rabbitmq as dramatiq_rabbitmq

from engine.broker import rabbit_jobs
from engine.broker.backend import open_job_queue
from engine.broker.jobs import Fence
from engine.broker.rabbit_settle import settled_key
from engine.store import keys
from tests.conftest import _rabbitmqctl
from tests.engine_support import Engine, holds_for, user, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str, rabbit_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url, rabbit_url) as harness:
        yield harness


class StallingProxy:
    """A TCP proxy to RabbitMQ whose traffic the test can stop and resume (a stalled network
    or broker, without touching the machine's RabbitMQ)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.refusing = False  # close every new connection at once (a broker that is down)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += (writer, up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        """Reset every connection through the proxy (new ones are still accepted)."""
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.flowing.set()
        for task in list(self.tasks):
            task.cancel()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def through(proxy_port: int, url: str) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0]
    return parts._replace(netloc=f"{auth}@127.0.0.1:{proxy_port}").geturl()


async def waiting(engine: Engine) -> int:
    return int((await engine.jobs.stats())["waiting"])


async def test_a_fenced_batch_lands_only_with_margin_left_on_the_lease(engine: Engine) -> None:
    fence = Fence("prefetch:test:fence", "leader-1:7")
    margin = rabbit_jobs.fence_margin_ms(engine.settings)
    await engine.queue.execute("SET", fence.key, fence.value, "PX", margin * 5)
    assert await engine.jobs.schedule_batch([user()], "medium", fence=fence) is not None
    # Still the leader's, but it could expire before a publish is confirmed: refused.
    await engine.queue.execute("SET", fence.key, fence.value, "PX", margin // 2)
    assert await engine.jobs.schedule_batch([user()], "medium", fence=fence) is None
    await engine.queue.execute("SET", fence.key, "leader-2:8", "PX", margin * 5)
    assert await engine.jobs.schedule_batch([user()], "medium", fence=fence) is None
    assert await waiting(engine) == 1


async def test_a_fenced_batch_not_confirmed_within_the_margin_counts_as_fenced(
    engine: Engine,
) -> None:
    parts = urlsplit(engine.broker_url)
    proxy = StallingProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    port = await proxy.start()
    settings = engine.settings.with_overrides(broker_url=through(port, engine.broker_url))
    jobs = open_job_queue(settings, engine.queue)
    fence = Fence("prefetch:test:fence", "leader-1:7")
    await engine.queue.execute("SET", fence.key, fence.value, "PX", 60_000)
    try:
        assert await jobs.schedule_batch([user()], "medium", fence=fence) is not None
        proxy.flowing.clear()  # the broker stops answering
        started = time.monotonic()
        assert await jobs.schedule_batch([user()], "medium", fence=fence) is None
        took = time.monotonic() - started
        print(f"fenced after {took:.2f}s")
        assert took < rabbit_jobs.PUBLISH_TIMEOUT_S, "it waited the margin, not a publish timeout"
        # The remaining window: the publish that was not confirmed in time lands later.
        proxy.flowing.set()
        await wait_for(lambda: _eq(waiting(engine), 2), 10, "the late publish to land")
    finally:
        proxy.flowing.set()
        await jobs.close()
        await proxy.stop()


@pytest.mark.timeout(150)
async def test_lost_broker_connections_lose_no_job_and_count_each_once(engine: Engine) -> None:
    parts = urlsplit(engine.broker_url)
    proxy = StallingProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    port = await proxy.start()
    try:
        await engine.start_sandbox(latency_ms=100)
        supervisor = await engine.start_worker(
            BROKER_URL=through(port, engine.broker_url), PREFETCH_JOB_CONCURRENCY="20"
        )
        workers = supervisor.workers()
        users = [user() for _ in range(300)]
        for start in range(0, len(users), 100):
            await asyncio.gather(
                *(engine.jobs.schedule(u, "medium") for u in users[start : start + 100])
            )
        await wait_for(lambda: _completed_at_least(engine, 30), 30, "jobs under way")
        proxy.cut()  # every consumer and publisher connection of both workers drops

        await wait_for(lambda: _all_cached(engine, users), 90, "every job after the cut")

        async def settled() -> bool:
            stats = await engine.jobs.stats()
            busy = stats["waiting"] or stats["active"] or stats["delayed"]
            return not busy and not await engine.acks()

        await wait_for(settled, 30, "an empty queue")
        stats = await engine.jobs.stats()
        # Messages of the dropped channels came back (some already run): each counted once.
        assert (stats["completed"], stats["failed"], stats["dead"]) == (len(users), 0, 0)
        counts = [(await engine.sandbox_stats())["byUser"].get(u, 0) for u in users]
        assert min(counts) >= 1 and max(counts) <= 2, "at least once, at most twice"
        pending = await engine.queue.pipeline([("EXISTS", keys.pending_job(u)) for u in users])
        assert not any(pending)
        assert supervisor.workers() == workers, "no worker had to be replaced"
        # Only the connection losses themselves, as pika (with its tracebacks of the reset)
        # and Dramatiq's consumers report them: no error of ours, no traceback through ours.
        expected = (
            '"logger":"pika.',  # JSON lines (the worker logs JSON)
            "] pika.",  # text lines
            "Consumer encountered a connection error",
            "Traceback",
        )
        unexpected = [line for line in engine.error_lines() if not any(e in line for e in expected)]
        assert unexpected == []
        ours = [
            line
            for line in supervisor.log().splitlines()
            if line.strip().startswith("File") and ("/engine/" in line or "/prefetch/" in line)
        ]
        assert ours == []
    finally:
        await proxy.stop()


@pytest.mark.timeout(120)
async def test_workers_started_while_the_broker_is_down_wait_for_it_then_serve(
    engine: Engine,
) -> None:
    parts = urlsplit(engine.broker_url)
    proxy = StallingProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    proxy.refusing = True
    port = await proxy.start()
    try:
        supervisor = await engine.start_worker(
            ready=False, BROKER_URL=through(port, engine.broker_url)
        )
        await wait_for(lambda: len(supervisor.workers()) == 2, 20, "two workers")
        workers = supervisor.workers()
        # Degraded but alive: no worker exits (no crash loop), none claims to consume.
        await holds_for(
            lambda: _both(supervisor.workers() == workers, _not_ready(engine, supervisor)),
            3.0,
            "the workers waiting for the broker",
        )
        proxy.refusing = False
        await engine.wait_ready(supervisor, 2, timeout=30)
        uid = user()
        await engine.jobs.schedule(uid, "high")
        await wait_for(lambda: engine.count_cached("hot", [uid]), 15, "a job once it is back")
        assert supervisor.workers() == workers
        log = supervisor.log()
        # Each consumer retries every second; it says so at most every few seconds.
        assert 0 < log.count("Consumer encountered a connection error") <= 2 * 6 * 2
    finally:
        await proxy.stop()


async def _not_ready(engine: Engine, supervisor: object) -> bool:
    return not await engine.consuming(supervisor)  # type: ignore[arg-type]


async def _both(first: bool, second: object) -> bool:
    return first and bool(await second)  # type: ignore[misc]


async def _completed_at_least(engine: Engine, count: int) -> bool:
    return int((await engine.jobs.stats())["completed"]) >= count


async def _all_cached(engine: Engine, users: list[str]) -> bool:
    return await engine.count_cached("warm", users) == len(users)


async def test_a_mark_is_short_lived_until_its_message_is_confirmed(engine: Engine) -> None:
    queued = user()
    await engine.jobs.schedule(queued, "low")
    fields = await engine.queue.execute("HGET", keys.pending_job(queued), "state")
    assert fields == b"queued"
    assert await engine.queue.execute("PTTL", keys.pending_job(queued)) > 3_000_000

    # A process that died between the mark and the publish: only the mark step ran.
    orphan = user()
    reply = await engine.queue.evalsha_or_eval(
        rabbit_jobs._MARK,
        [keys.pending_job(orphan)],
        [
            f"prefetch:{orphan}:1",
            1,
            "low",
            0,
            str(uuid.uuid4()),
            rabbit_jobs.MARK_LEASE_MS,
            0,
            "low",
        ],
    )
    assert reply[0] == 1
    assert (
        0
        < await engine.queue.execute("PTTL", keys.pending_job(orphan))
        <= (rabbit_jobs.MARK_LEASE_MS)
    )
    # Meanwhile it answers for the user (the window a mark can outlive a message).
    assert (await engine.jobs.schedule(orphan, "low")).deduplicated
    assert await waiting(engine) == 1


async def test_a_redelivery_whose_outcome_is_written_is_only_acknowledged(engine: Engine) -> None:
    uid = user()
    await engine.jobs.schedule(uid, "medium")

    def take_and_lose_the_ack() -> dramatiq.Message[object]:
        connection = pika.BlockingConnection(pika.URLParameters(engine.broker_url))
        try:
            method, _, body = connection.channel().basic_get("medium", auto_ack=False)
            assert method is not None
            return dramatiq.Message.decode(body)
        finally:
            connection.close()  # unacknowledged: the broker delivers it again, redelivered

    message = await asyncio.to_thread(take_and_lose_the_ack)
    # As if a worker had written its outcome and died before its ack reached the broker.
    await engine.queue.execute("SET", settled_key(message), "1", "PX", 60_000)  # type: ignore[arg-type]
    await engine.queue.execute("DEL", keys.pending_job(uid))

    await engine.start_worker()

    async def acknowledged() -> bool:
        stats = await engine.jobs.stats()
        return (stats["waiting"], stats["active"]) == (0, 0) and not await engine.acks()

    await wait_for(acknowledged, 10, "the redelivered message to be acknowledged")
    await holds_for(lambda: _eq(engine.fetches(uid), 0), 0.5, "no fetch for it")
    assert (await engine.jobs.stats())["completed"] == 0, "its outcome is counted once"
    assert engine.error_lines() == []


async def test_a_delayed_message_held_long_is_handed_back_and_runs_once_at_its_eta(
    engine: Engine,
) -> None:
    # RabbitMQ closes a channel whose delivery stays unacknowledged past its consumer_timeout
    # (30 min): a worker hands a held delayed message back well before that (here: 300 ms).
    supervisor = await engine.start_worker(BROKER_REHOLD_MS="300", PREFETCH_WORKER_COUNT="1")
    uid = user()
    started = time.monotonic()
    await engine.jobs.schedule(uid, "medium", delay_ms=3_000)
    await wait_for(lambda: "handed back 1 delayed" in supervisor.log(), 5, "a hand-back")

    async def cached() -> float | None:
        return time.monotonic() if await engine.count_cached("warm", [uid]) else None

    cached_at = await wait_for(cached, 15, "the delayed job", interval=0.02)
    assert cached_at - started >= 3.0, "it ran before its eta"
    await wait_for(
        lambda: _eq(engine.jobs.stats(), {**_zero_stats(), "completed": 1}), 5, "one completion"
    )
    assert await engine.fetches(uid) == 1
    assert engine.error_lines() == []


def _zero_stats() -> dict[str, object]:
    zero = {"waiting": 0, "active": 0, "delayed": 0, "dead": 0}
    return {
        "name": "prefetch",
        **zero,
        "completed": 0,
        "failed": 0,
        "byPriority": {p: dict(zero) for p in ("high", "medium", "low")},
    }


async def test_queues_are_quorum_queues_by_default(engine: Engine) -> None:
    await engine.jobs.schedule(user(), "high")

    def declare_as(queue: str, arguments: dict[str, object]) -> int | None:
        connection = pika.BlockingConnection(pika.URLParameters(engine.broker_url))
        try:
            connection.channel().queue_declare(queue, durable=True, arguments=arguments)
            return None
        except pika.exceptions.ChannelClosedByBroker as exc:
            return int(exc.reply_code)
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    quorum = {"x-queue-type": "quorum", "x-dead-letter-exchange": ""}
    assert (
        await asyncio.to_thread(
            declare_as, "high", {**quorum, "x-dead-letter-routing-key": "high.XQ"}
        )
        is None
    )
    # A classic declare of the same queue is refused: the queue is not classic.
    assert await asyncio.to_thread(declare_as, "high", {"x-queue-type": "classic"}) == 406
    # Quorum queues and x-max-priority do not mix on this RabbitMQ (3.x): priority is by queue.
    assert await asyncio.to_thread(declare_as, "probe", {**quorum, "x-max-priority": 3}) == 406


@pytest.mark.timeout(120)
async def test_classic_queues_serve_jobs_too(
    tmp_path: Path, redis_url: str, rabbit_url: str
) -> None:
    vhost = f"{urlsplit(rabbit_url).path.lstrip('/')}-classic"
    parts = urlsplit(rabbit_url)
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        url = parts._replace(path="/" + quote(vhost, safe="")).geturl()
        async with Engine.open(tmp_path, redis_url, url) as engine:
            engine.settings = engine.settings.with_overrides(broker_queue_type="classic")
            await engine.jobs.close()
            engine.jobs = open_job_queue(engine.settings, engine.queue)
            uid = user()
            await engine.jobs.schedule(uid, "medium", delay_ms=300)
            await engine.start_worker(BROKER_QUEUE_TYPE="classic")
            await wait_for(lambda: engine.count_cached("warm", [uid]), 15, "the job on classic")
            assert engine.error_lines() == []
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def test_the_dramatiq_rabbitmq_internals_the_settler_uses_are_there() -> None:
    consumer = dramatiq_rabbitmq._RabbitmqConsumer
    assert {"ack", "nack", "close", "__next__"} <= set(vars(consumer))
    source = consumer.__init__.__code__.co_names
    assert {"known_tags", "connection", "channel"} <= set(source)
    message = dramatiq_rabbitmq._RabbitmqMessage
    assert {"redelivered", "_tag"} <= set(message.__init__.__code__.co_names)
    broker = dramatiq_rabbitmq.RabbitmqBroker
    for name in ("_build_queue_arguments", "_declare_xq_queue", "channel", "connection"):
        assert hasattr(broker, name), name
    assert dramatiq_rabbitmq.DEAD_MESSAGE_TTL > 0


async def _eq(awaitable: object, expected: object) -> bool:
    return await awaitable == expected  # type: ignore[misc]

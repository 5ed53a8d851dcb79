"""The queues fetched on the event loop (engine/broker/loop_consumer.py), on real Redis.

Each test builds the worker's own broker (its middleware and actors) and a LoopConsumer
over a real work queue, and reads the result in Redis: Dramatiq's queue list, this broker
id's ack set, its dead-letter set, and our failed list.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import pytest_asyncio
from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis

from engine.broker import dramatiq_layout as layout
from engine.broker.dramatiq_worker import WorkQueue
from engine.broker.jobs import FAILED_KEEP, QUEUES, actor_name, job_kwargs
from engine.broker.loop_consumer import LoopConsumer
from engine.broker.worker import EXIT_CONSUMER_DIED, _watch, make_broker, make_worker
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from engine.supervisor import EXIT_OK
from sandbox.timeline import SLOW_PREFIX  # answered after 60 s
from tests.engine_support import DB_QUEUE, Engine, PrivateRedis, holds_for, user, wait_for

BROKER_ID = "loop-consumer-test"
DQ_MSGS = layout.messages_key("medium.DQ")
PREFETCH = 4
POLL_MS = 50


@dataclass
class Rig:
    queue: FastRedis
    broker: layout.PrefetchBroker
    work: WorkQueue
    consumer: LoopConsumer

    def send(self, count: int, actor: str | None = None, delay_ms: int = 0) -> list[str]:
        """Enqueue `count` single-user jobs through Dramatiq (delayed: on `medium.DQ`); their
        redis ids."""
        ids = []
        for _ in range(count):
            uid = user()
            message = dramatiq.Message(
                queue_name="medium",
                actor_name=actor or actor_name("medium"),
                args=(uid, f"prefetch:{uid}:1"),
                kwargs=job_kwargs("schedule", False),
                options={},
            )
            sent = self.broker.enqueue(message, delay=delay_ms or None)
            ids.append(sent.options["redis_message_id"])
        return ids

    async def waiting(self) -> int:
        return int(await self.queue.execute("LLEN", layout.queue_key("medium")))

    async def held(self, queue: str = "medium") -> set[str]:
        members = await self.queue.execute("SMEMBERS", layout.acks_key(BROKER_ID, queue))
        return {m.decode() for m in members}

    async def listed(self, queue: str = "medium") -> list[str]:
        ids = await self.queue.execute("LRANGE", layout.queue_key(queue), 0, -1)
        return [i.decode() for i in ids]

    def take(self) -> list[MessageProxy]:
        taken = []
        while not self.work.empty():
            taken.append(self.work.get_nowait().message)
        return taken

    async def ack(self, messages: list[MessageProxy]) -> None:
        groups: list[Any] = []
        for message in messages:
            rid = message.options["redis_message_id"]
            groups += layout.settle_group("ack", "medium", rid, None)
        await layout.settle(self.queue, BROKER_ID, groups, FAILED_KEEP)
        for message in messages:
            self.consumer.settled(message)


def rig_on(url: str, db: int, queue: FastRedis) -> Rig:
    settings = Settings().with_overrides(redis_url=url, db_queue=db)
    broker, _, _ = make_broker(settings, BROKER_ID)
    assert isinstance(broker, layout.PrefetchBroker)
    work = WorkQueue()
    consumer = LoopConsumer(
        broker, queue, work, prefetch=PREFETCH, delay_prefetch=PREFETCH, poll_ms=POLL_MS
    )
    return Rig(queue, broker, work, consumer)


@pytest_asyncio.fixture
async def rig(tmp_path: Path, redis_url: str) -> AsyncIterator[Rig]:
    async with Engine.open(tmp_path, redis_url) as engine:
        made = rig_on(redis_url, DB_QUEUE, engine.queue)
        yield made
        await made.consumer.close()
        made.broker.close()


async def test_it_fetches_up_to_its_prefetch_and_more_as_messages_settle(rig: Rig) -> None:
    sent = rig.send(10)
    rig.consumer.add("medium")
    await wait_for(lambda: rig.work.qsize() == PREFETCH, 5, "a full prefetch")
    # Full: no more is fetched while nothing settles, over many poll periods.
    await holds_for(lambda: rig.work.qsize() == PREFETCH, POLL_MS * 6 / 1000, "prefetch bound")
    assert await rig.waiting() == 10 - PREFETCH
    first = rig.take()
    assert [m.options["redis_message_id"] for m in first] == sent[:PREFETCH]  # FIFO within one
    assert await rig.held() == set(sent[:PREFETCH])
    # Two settle: their room is fetched again, and no more.
    await rig.ack(first[:2])
    await wait_for(lambda: rig.work.qsize() == 2, 5, "the freed room fetched")
    await holds_for(lambda: rig.work.qsize() == 2, POLL_MS * 4 / 1000, "prefetch bound")
    assert await rig.held() == set(sent[2:6])


async def test_a_message_for_an_unknown_actor_is_dead_lettered_with_a_record(rig: Rig) -> None:
    # Sent by a newer (or older) deployment: this worker has no such actor.
    (rid,) = rig.send(1, actor="retired_actor")
    rig.consumer.add("medium")

    async def dead() -> bool:
        return bool(await rig.queue.execute("ZSCORE", layout.dead_key("medium"), rid))

    await wait_for(dead, 5, "the message in Dramatiq's dead-letter set")
    assert rig.work.empty()
    assert await rig.held() == set()
    records = await rig.queue.execute("LRANGE", keys.FAILED_JOBS, 0, -1)
    assert any(b"retired_actor" in r and b"rejected by Dramatiq" in r for r in records)
    # Its room in the prefetch is free again: later messages are fetched.
    rig.send(1)
    await wait_for(lambda: rig.work.qsize() == 1, 5, "the next message fetched")


async def test_close_hands_back_what_was_fetched_and_not_started(rig: Rig) -> None:
    sent = rig.send(6)
    rig.consumer.add("medium")
    await wait_for(lambda: rig.work.qsize() == PREFETCH, 5, "a full prefetch")
    await rig.consumer.close()
    assert rig.work.empty()
    assert await rig.held() == set()
    assert await rig.waiting() == 6
    assert rig.consumer.dead() == []  # closed, not dead
    listed = await rig.queue.execute("LRANGE", layout.queue_key("medium"), 0, -1)
    assert {m.decode() for m in listed} == set(sent)


class BrokenWorkQueue(WorkQueue):
    """A fault no real run produces: a bug past the fetch, which ends the queue's task."""

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        raise RuntimeError("a bug")


async def test_a_worker_whose_fetching_task_failed_logs_it_and_exits_to_be_replaced(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    broken = LoopConsumer(
        rig.broker,
        rig.queue,
        BrokenWorkQueue(),
        prefetch=PREFETCH,
        delay_prefetch=PREFETCH,
        poll_ms=POLL_MS,
    )
    worker = make_worker(Settings(), rig.broker)
    worker.loop_consumer = broken
    worker._add_consumer("medium")  # as Dramatiq's Worker.start does for each ready queue
    assert worker.consumers == {}  # no thread for it
    assert worker.dead_consumers() == []
    rig.send(1)
    code = await asyncio.wait_for(_watch(worker, asyncio.Event()), 10)
    assert code == EXIT_CONSUMER_DIED
    assert worker.dead_consumers() == ["medium"]
    assert any("consume medium failed" in r.getMessage() and r.exc_info for r in caplog.records)
    await broken.close()


async def test_it_outlives_a_redis_restart_and_fetches_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await PrivateRedis(tmp_path / "redis", "--appendonly", "yes").start()
    queue = FastRedis(server.url, 0)
    made = rig_on(server.url, 0, queue)

    async def fetched_once() -> bool:  # dispatch.lua beats the heartbeat on every fetch
        return await queue.execute("ZSCORE", layout.HEARTBEATS, BROKER_ID) is not None

    def fetch_failed() -> bool:
        return any("could not fetch from medium" in r.getMessage() for r in caplog.records)

    try:
        made.consumer.add("medium")
        await wait_for(fetched_once, 5, "a first fetch")
        server.kill()
        # Down: fetches fail, and the task keeps trying instead of dying.
        await wait_for(fetch_failed, 10, "a failed fetch logged")
        await holds_for(lambda: made.consumer.dead() == [], 1.5, "the task alive")
        await server.start()
        sent = made.send(2)
        await wait_for(lambda: made.work.qsize() == 2, 10, "fetching resumed")
        assert {m.options["redis_message_id"] for m in made.take()} == set(sent)
    finally:
        await made.consumer.close()
        made.broker.close()
        await queue.close()
        server.stop()


async def test_close_right_after_a_settle_frees_room_stops_the_fetching(rig: Rig) -> None:
    # The settle wakes the full queue's task in the same loop turn as close() cancels it:
    # the cancel must still win (Python 3.11's asyncio.wait_for would swallow it).
    rig.send(10)
    rig.consumer.add("medium")
    await wait_for(lambda: rig.work.qsize() == PREFETCH, 5, "a full prefetch")
    await rig.ack(rig.take())
    await asyncio.sleep(0)  # the room's waiter is done; the task has not resumed yet
    await asyncio.wait_for(rig.consumer.close(), 5)
    assert all(task.done() for task in rig.consumer._tasks.values())
    assert await rig.held() == set()
    await holds_for(lambda: rig.work.empty(), POLL_MS * 4 / 1000, "nothing fetched after close")
    assert await rig.waiting() == 10 - PREFETCH


# --- delay queues -----------------------------------------------------------------------------


async def test_a_delayed_message_is_held_until_its_eta_then_moved_to_its_queue_under_its_id(
    rig: Rig,
) -> None:
    (rid,) = rig.send(1, delay_ms=1_500)
    eta = dramatiq.Message.decode(await rig.queue.execute("HGET", DQ_MSGS, rid)).options["eta"]
    rig.consumer.add("medium")
    rig.consumer.add("medium.DQ")
    await wait_for(lambda: rig.consumer.held_ids() == {rid}, 5, "the delayed message held")
    if current_millis() < eta - 200:  # still before its eta: it waits, in this worker's ack set
        assert await rig.held("medium.DQ") == {rid}
        assert await rig.listed("medium") == []
        assert rig.work.empty()
    await wait_for(lambda: rig.work.qsize() == 1, 10, "the promoted message fetched")
    assert current_millis() >= eta
    (message,) = rig.take()
    assert message.options["redis_message_id"] == rid  # the same id: a pending mark follows it
    assert message.queue_name == "medium" and "eta" not in message.options
    assert rig.consumer.held_ids() == set()
    assert await rig.held("medium.DQ") == set()
    assert await rig.queue.execute("HLEN", DQ_MSGS) == 0


async def test_delayed_messages_come_out_in_eta_order_whatever_their_fetch_order(
    rig: Rig,
) -> None:
    late = rig.send(1, delay_ms=2_000)
    early = rig.send(1, delay_ms=600)
    rig.consumer.add("medium.DQ")
    await wait_for(lambda: len(rig.consumer.held_ids()) == 2, 5, "both held")
    await wait_for(lambda: len(rig.consumer.held_ids()) == 1, 10, "the first promoted")
    assert rig.consumer.held_ids() == set(late)
    assert await rig.listed("medium") == early
    await wait_for(lambda: not rig.consumer.held_ids(), 10, "the second promoted")
    assert await rig.listed("medium") == early + late


async def test_close_hands_back_the_delayed_messages_it_holds(rig: Rig) -> None:
    sent = rig.send(3, delay_ms=60_000)
    rig.consumer.add("medium.DQ")
    await wait_for(lambda: len(rig.consumer.held_ids()) == 3, 5, "all held")
    await rig.consumer.close()
    assert rig.consumer.held_ids() == set()
    assert await rig.held("medium.DQ") == set()
    assert sorted(await rig.listed("medium.DQ")) == sorted(sent)  # waiting there for another
    assert await rig.listed("medium") == []


async def test_a_promotion_that_fails_while_redis_is_down_is_kept_and_made_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # (Under maxmemory Redis still runs promote.lua whole: its first write, SREM, frees memory,
    # and a script that has written is not stopped halfway. A dead server is the real fault.)
    server = await PrivateRedis(
        tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always"
    ).start()
    queue = FastRedis(server.url, 0)
    made = rig_on(server.url, 0, queue)

    def promotion_failed() -> bool:
        return any("could not move 1 delayed" in r.getMessage() for r in caplog.records)

    try:
        (rid,) = made.send(1, delay_ms=1_000)
        made.consumer.add("medium.DQ")
        await wait_for(lambda: made.consumer.held_ids() == {rid}, 5, "the delayed message held")
        server.kill()
        await wait_for(promotion_failed, 10, "a failed promotion logged")
        assert made.consumer.held_ids() == {rid}  # kept, and in the reclaimer's view
        assert made.consumer.dead() == []
        await server.start()
        await wait_for(lambda: not made.consumer.held_ids(), 10, "promoted once Redis is back")
        assert await made.listed("medium") == [rid]
        assert await made.held("medium.DQ") == set()
    finally:
        await made.consumer.close()
        made.broker.close()
        await queue.close()
        server.stop()


async def test_a_draining_worker_keeps_its_heartbeat_after_it_stops_fetching(
    tmp_path: Path, redis_url: str
) -> None:
    # Its fetches beat the heartbeat, and they stop as the drain starts; a drain longer than
    # the heartbeat timeout (15 s) would otherwise let another worker's maintenance hand back
    # the jobs still running here. The worker beats every third of it meanwhile.
    async with Engine.open(tmp_path, redis_url) as engine:
        supervisor = await engine.start_worker(
            # A drain of 10 s: the second beat (about 5 s in) comes well before its end.
            PREFETCH_WORKER_COUNT="1",
            PREFETCH_SHUTDOWN_TIMEOUT="10000",
        )
        slow = user(SLOW_PREFIX)
        await engine.jobs.schedule(slow, "high")
        await wait_for(lambda: engine.fetches(slow), 5, "the slow fetch to start")
        os.kill(supervisor.pid, signal.SIGTERM)
        signalled_ms = int(time.time() * 1000)

        async def beaten_while_draining() -> bool:
            beats = await engine.queue.execute("ZRANGE", layout.HEARTBEATS, 0, -1, "WITHSCORES")
            return any(int(score) >= signalled_ms + 4_000 for score in beats[1::2])

        await wait_for(beaten_while_draining, 8, "a heartbeat 4 s into the drain")
        assert supervisor.proc.poll() is None, "still draining: the beat came from the drain"
        assert await supervisor.wait_exit(12) == EXIT_OK


async def test_idle_queues_are_polled_together_one_write_for_all(tmp_path: Path) -> None:
    server = await PrivateRedis(tmp_path / "redis").start()
    queue = FastRedis(server.url, 0)
    counter = FastRedis(server.url, 0)  # INFO on a client of its own: not in `queue`'s writes
    made = rig_on(server.url, 0, queue)

    async def fetches() -> int:
        info = (await counter.execute("INFO", "commandstats")).decode()
        found = re.search(r"cmdstat_evalsha:calls=(\d+)", info)
        return int(found.group(1)) if found else 0

    try:
        for name in QUEUES.values():
            made.consumer.add(name)
            made.consumer.add(f"{name}.DQ")
        await wait_for(lambda: fetches_at_least(fetches, 60), 10, "the polls at their backoff")
        writes, polled = queue.writes, await fetches()
        await wait_for(lambda: fetches_at_least(fetches, polled + 60), 10, "60 more polls")
        writes, polled = queue.writes - writes, await fetches() - polled
        # Six empty queues whose polls fall on the same instants share each write; apart, each
        # poll would be a write of its own.
        assert writes <= polled / 3, f"{writes} writes for {polled} polls"
    finally:
        await made.consumer.close()
        made.broker.close()
        await queue.close()
        await counter.close()
        server.stop()


async def fetches_at_least(fetches: Any, count: int) -> bool:
    return bool(await fetches() >= count)

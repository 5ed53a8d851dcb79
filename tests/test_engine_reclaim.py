"""A message stranded in a live worker's ack set is handed back and runs.

Dramatiq's fetch moves ids into the consumer's ack set and replies with their data in one
script call; when the reply is lost (Redis killed mid-reply) the ids stay in that live
worker's ack set, and nothing ran them until the worker died (found by `python -m bench.soak`).
The worker now hands back, every few seconds, ids of its ack sets that it holds nowhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import job_kwargs, job_message
from engine.store import keys
from tests.engine_support import Engine, user, wait_for


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url) as harness:
        yield harness


async def test_a_message_fetched_but_never_received_is_handed_back_and_runs(
    engine: Engine,
) -> None:
    supervisor = await engine.start_worker(PREFETCH_WORKER_COUNT="1")
    (broker_id,) = await engine.consuming(supervisor)
    stranded, normal = user(), user()
    job_id = f"prefetch:{stranded}:1"
    # What a fetch whose reply was lost leaves behind: the message in the queue's hash and
    # its id in the worker's ack set, and nowhere in the worker's memory.
    message = layout.encode(
        layout.encoder_broker(),
        job_message("medium", (stranded, job_id), job_kwargs("schedule", False)),
    )
    await engine.queue.pipeline(
        [
            ("HSET", layout.messages_key(message.queue), message.redis_id, message.data),
            ("SADD", layout.acks_key(broker_id, message.queue), message.redis_id),
            ("HSET", keys.pending_job(stranded), "jobId", job_id, "priority", "medium"),
        ]
    )
    await engine.jobs.schedule(normal, "medium")  # the worker is busy meanwhile, and well

    async def all_cached() -> bool:
        return await engine.count_cached("warm", [stranded, normal]) == 2

    await wait_for(all_cached, 30, "the stranded job run (two sweeps, 5 s apart)")
    await wait_for(lambda: _no_acks(engine), 10, "the ack sets empty")
    assert await engine.fetches(stranded) == 1
    assert await engine.queue.execute("EXISTS", keys.pending_job(stranded)) == 0
    assert supervisor.workers(), "the worker lived on: nothing but the sweep handed it back"
    assert "handed back 1 messages stranded" in supervisor.log()


async def _no_acks(engine: Engine) -> bool:
    return await engine.acks() == {}

"""The job engine's own CPU per message, with an actor that does nothing.

    .venv/bin/python -m bench.bench_engine_overhead --messages 30000 --rounds 3

What a worker spends on a message besides the job itself: the fetch and decode (on the
loop), the work queue, the executor's task, the middleware hooks
(CurrentMessage, JobOutcome, Retries) and the batched settle with its acknowledgement. This
process builds a worker's broker, LoopWorker, executor and settler (engine/broker/worker.py
does the same, around a real actor) on a real Redis (REDIS_URL, else an embedded Valkey; the
bench's queue DB, flushed), enqueues `--messages` single-user jobs through Dramatiq, then
times their run with every actor replaced by a coroutine that only counts. CPU is this whole
process's (`time.process_time`, every thread) over the messages; the loop thread's share is
read from /proc. bench_prefetch measures the same engine end to end, where this overhead
sits beside the unit of work (fetch, decode, encode, gzip, store: bench_components).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

import uvloop

from bench.common import BENCH_DBS, flush_bench_dbs, machine, print_table, redis_target, save_result
from engine.broker import dramatiq_layout as layout
from engine.broker.executor import Executor, RedisSettler
from engine.broker.jobs import FAILED_KEEP, actor_name, job_kwargs
from engine.broker.worker import make_broker, make_loop_consumer, make_worker
from engine.settings import Settings
from engine.store.fastredis import FastRedis

QUEUE_DB = BENCH_DBS["REDIS_DB_QUEUE"]
BROKER_ID = "bench-engine-overhead"


def _thread_cpu_s(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0]) / 1e9


async def one_round(url: str, messages: int, concurrency: int) -> dict[str, float]:
    settings = Settings().with_overrides(redis_url=url, db_queue=QUEUE_DB)
    broker, _, handlers = make_broker(settings, BROKER_ID)
    assert isinstance(broker, layout.PrefetchBroker)
    done = 0
    finished = asyncio.Event()

    async def count(*_: Any, **__: Any) -> None:
        nonlocal done
        done += 1
        if done == messages:
            finished.set()

    actor = broker.actors[actor_name("medium")]
    for n in range(messages):
        actor.send_with_options(
            args=(f"u{n}", f"prefetch:u{n}:1"), kwargs=job_kwargs("schedule", False)
        )
    queue = await FastRedis.connect(url, QUEUE_DB)
    worker = make_worker(settings, broker)
    settler = RedisSettler(broker, worker, queue, FAILED_KEEP)
    executor = Executor(
        broker, worker, settler, dict.fromkeys(handlers, count), concurrency=concurrency
    )
    worker.loop_consumer = make_loop_consumer(settings, broker, queue, worker)
    loop_tid = threading.get_native_id()
    cpu0, loop0, wall0 = time.process_time(), _thread_cpu_s(loop_tid), time.perf_counter()
    worker.start()
    executor.start()
    await finished.wait()
    await executor.drain(30.0)  # the last jobs end, and their settle lands
    wall = time.perf_counter() - wall0
    cpu, loop_cpu = time.process_time() - cpu0, _thread_cpu_s(loop_tid) - loop0
    await worker.loop_consumer.close()
    await asyncio.to_thread(worker.stop, 1_000)
    await queue.close()
    broker.close()
    return {
        "msgs_per_s": messages / wall,
        "cpu_us": cpu / messages * 1e6,
        "loop_us": loop_cpu / messages * 1e6,
        "threads_us": (cpu - loop_cpu) / messages * 1e6,
    }


def measure(messages: int, rounds: int, concurrency: int, redis_url: str | None) -> dict[str, Any]:
    found: list[dict[str, float]] = []
    with redis_target(redis_url) as url:
        for n in range(rounds):
            flush_bench_dbs(url)
            found.append(uvloop.run(one_round(url, messages, concurrency)))
            print(
                f"  round {n + 1}/{rounds}: {found[-1]['cpu_us']:.1f} µs/message "
                f"({found[-1]['msgs_per_s']:,.0f}/s)"
            )
        flush_bench_dbs(url)
    medians = {key: sorted(r[key] for r in found)[len(found) // 2] for key in found[0]}
    return {
        "messages": messages,
        "rounds": rounds,
        "concurrency": concurrency,
        "medians": medians,
        "all_rounds": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    found = measure(args.messages, args.rounds, args.concurrency, args.redis_url)
    m = found["medians"]
    print(
        f"\nengine CPU per message, no-op actor, medians of {args.rounds} rounds of {args.messages}"
    )
    print_table(
        ["messages/s", "CPU µs/message", "event loop", "other threads"],
        [
            [
                f"{m['msgs_per_s']:,.0f}",
                f"{m['cpu_us']:.1f}",
                f"{m['loop_us']:.1f}",
                f"{m['threads_us']:.1f}",
            ]
        ],
    )
    print(f"saved {save_result('engine-overhead', {'machine': machine(), **found})}")


if __name__ == "__main__":
    main()

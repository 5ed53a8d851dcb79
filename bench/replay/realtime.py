"""The real-time run: the replay against the real service, with time compressed.

Processes: a private embedded Valkey, `prefetch sandbox` (timeline and CA, with
SANDBOX_LATENCY_MS), and per strategy mix a fresh `prefetch api` and `prefetch worker`
(supervisor, one worker, the scheduler child, which takes the lease and ticks), all with every
TTL, interval and window divided by the compression factor `k` (default 60: one virtual hour
per real minute; ACTIVITY_CHECK_INTERVAL's floor of 1 s allows no more):

    HOT_CACHE_TTL, WARM_CACHE_TTL, ACTIVITY_CHECK_INTERVAL, ACTIVITY_WINDOW,
    ACTIVITY_REFRESH_LEAD, PREDICTIVE_LEAD_TIME, PREDICTIVE_HOLD_TIME, PREDICTIVE_HALF_LIFE,
    PREDICTIVE_TTL, PREDICTIVE_HOUR (the profile's hour, hence its day); PREDICTIVE_DAY_OFFSET
    is set so that the compressed days keep the population's weekdays

What is not scaled: the API's 1 s activity flush, the usefulness sweep's 5 s grace, the
upstream and job latencies, the lease. At k = 60 a flush is a virtual minute late at worst.

The population's time is mapped to the wall clock (`population.compress`): the window's
start lands a few seconds after its history was recorded. The history (every read before
the window) is recorded as the API's flushes would record it (activity, sessions, profiles)
before the services start; then the driver sends each read (`GET /api/cache/{id}`, gzip,
`sandbox-service`) and each post (`POST /api/prefetch/events` for the poster's followers, in
mixes with events) at its compressed time over real HTTP. Measured: hit (`meta.cached`),
latency, staleness (`data.fetchedAt` older than the newest post in that timeline), which
prefetch stored the entry an app open got (its unread mark, read from Redis just before),
upstream fetches (the sandbox's counter), prefetch operations and usefulness
(`GET /api/prefetch/metrics`) and the queue depth (sampled every 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import orjson

from bench.common import Services, free_port, service_env, start_sandbox, wait_http
from bench.replay.mix_simulation import FLUSH_MS
from bench.replay.population import Population, Read, compress
from bench.replay.simulation import MIXES, replay_history
from bench.replay.tally import Tally
from bench.replay.virtual import REDIS_TIMEOUT_S
from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import QUEUES
from engine.settings import load_settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from engine.strategies.leader import Lease

TOKEN = "sandbox-service"
# Settings that carry time, and the variables that set them.
SCALED = {
    "hot_ttl_ms": "HOT_CACHE_TTL",
    "warm_ttl_ms": "WARM_CACHE_TTL",
    "activity_check_interval_ms": "ACTIVITY_CHECK_INTERVAL",
    "activity_window_ms": "ACTIVITY_WINDOW",
    "activity_refresh_lead_ms": "ACTIVITY_REFRESH_LEAD",
    "predictive_lead_ms": "PREDICTIVE_LEAD_TIME",
    "predictive_hold_ms": "PREDICTIVE_HOLD_TIME",
    "predictive_half_life_ms": "PREDICTIVE_HALF_LIFE",
    "predictive_hour_ms": "PREDICTIVE_HOUR",
    "predictive_ttl_ms": "PREDICTIVE_TTL",
}
DBS = {"REDIS_DB_HOT": 4, "REDIS_DB_WARM": 5, "REDIS_DB_QUEUE": 6, "REDIS_DB_METRICS": 7}


def scaled_env(env: dict[str, str], factor: float) -> dict[str, str]:
    """`env` with every time setting (SCALED) divided by `factor`, validated."""
    base = load_settings(env)
    out = dict(env)
    for field, name in SCALED.items():
        out[name] = str(max(1, round(getattr(base, field) / factor)))
    load_settings(out)  # a factor that pushes a value below its floor fails here
    return out


def mix_env(env: dict[str, str], mix: str) -> dict[str, str]:
    """`env` with the strategies of `mix` on and the others off."""
    activity, events, predictive = MIXES[mix]
    flags = {True: "true", False: "false"}
    return {
        **env,
        "ENABLE_ACTIVITY_BASED": flags[activity],
        "ENABLE_EVENT_TRIGGERED": flags[events],
        "ENABLE_PREDICTIVE": flags[predictive],
    }


class Driver:
    """Sends one mix's reads and posts at their times and tallies what came back."""

    def __init__(
        self,
        population: Population,
        tally: Tally,
        api_url: str,
        redis: dict[str, FastRedis],
        events: bool,
    ) -> None:
        self.population = population
        self.tally = tally
        self.api_url = api_url
        self.redis = redis
        self.events = events
        self.ids = [u.id for u in population.users]
        self.last_post_for = [0] * len(self.ids)
        self.errors = 0
        self.late_ms: list[float] = []

    async def run(self, start_ms: int, end_ms: int) -> None:
        """Send every read and post of [start_ms, end_ms) at its time (epoch ms)."""
        actions: list[tuple[int, int, Any]] = [
            (r.at, 1, r) for r in self.population.reads_between(start_ms, end_ms)
        ]
        actions += [(t, 0, u) for t, u in self.population.posts_between(start_ms, end_ms)]
        actions.sort(key=lambda a: (a[0], a[1]))
        headers = {"Authorization": f"Bearer {TOKEN}", "Accept-Encoding": "gzip"}
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(
            base_url=self.api_url, headers=headers, connector=connector
        ) as session:
            sampler = asyncio.create_task(self._sample_queue())
            pending: set[asyncio.Task[None]] = set()
            for at, _, item in actions:
                delay = at / 1000 - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.late_ms.append(-delay * 1000)
                if isinstance(item, Read):
                    task = asyncio.create_task(self._read(session, item))
                else:
                    task = asyncio.create_task(self._post(session, at, item))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    async def _served_by(self, user: str) -> str:
        """The origin of the unread prefetch a read would get now (hot first), or "read"."""
        shard = keys.shard_of(user)
        hot = self.redis["hot"]
        exists, hot_origin = await hot.pipeline(
            [
                ("EXISTS", keys.timeline("hot", user)),
                ("HGET", keys.unread_origin("hot", shard), user),
            ]
        )
        if exists:
            return hot_origin.decode() if hot_origin else "read"
        origin = await self.redis["warm"].execute("HGET", keys.unread_origin("warm", shard), user)
        return origin.decode() if origin else "read"

    async def _read(self, session: aiohttp.ClientSession, read: Read) -> None:
        user = self.ids[read.user]
        served = await self._served_by(user) if read.first else "read"
        newest_post = self.last_post_for[read.user]
        started = time.perf_counter()
        try:
            async with session.get(f"/api/cache/{user}") as rsp:
                raw = await rsp.read()
                latency_ms = (time.perf_counter() - started) * 1000
                if rsp.status != 200:
                    self.errors += 1
                    return
        except aiohttp.ClientError:
            self.errors += 1
            return
        body = orjson.loads(raw)
        hit = bool(body["meta"]["cached"])
        stale = hit and int(body["data"]["fetchedAt"]) < newest_post
        self.tally.read(read, hit, latency_ms, served, stale)

    async def _post(self, session: aiohttp.ClientSession, at: int, poster: int) -> None:
        followers = self.population.users[poster].followers
        for follower in followers:
            self.last_post_for[follower] = at
        if not self.events or not followers:
            return
        payload = {
            "type": "post.created",
            "userId": self.ids[poster],
            "affectedUserIds": [self.ids[f] for f in followers],
        }
        try:
            async with session.post("/api/prefetch/events", json=payload) as rsp:
                await rsp.read()
                if rsp.status != 202:
                    self.errors += 1
        except aiohttp.ClientError:
            self.errors += 1

    async def _sample_queue(self) -> None:
        queue = self.redis["queue"]
        while True:
            replies = await queue.pipeline([("LLEN", layout.queue_key(q)) for q in QUEUES.values()])
            self.tally.queue_depth(sum(int(r) for r in replies))
            await asyncio.sleep(0.1)


def _clients(url: str) -> dict[str, FastRedis]:
    return {
        "hot": FastRedis(url, DBS["REDIS_DB_HOT"], timeout=REDIS_TIMEOUT_S),
        "warm": FastRedis(url, DBS["REDIS_DB_WARM"], timeout=REDIS_TIMEOUT_S),
        "queue": FastRedis(url, DBS["REDIS_DB_QUEUE"], timeout=REDIS_TIMEOUT_S),
        "metrics": FastRedis(url, DBS["REDIS_DB_METRICS"], timeout=REDIS_TIMEOUT_S),
    }


async def _metrics(api_url: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api_url}/api/prefetch/metrics", headers=headers) as rsp,
    ):
        data: dict[str, Any] = (await rsp.json())["data"]
        return data


async def _fetches(timeline_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{timeline_url}/__stats") as rsp:
        return int((await rsp.json())["timelineFetches"])


async def run_mix(
    services: Services,
    redis_url: str,
    upstreams: dict[str, str],
    env: dict[str, str],
    mix: str,
    population: Population,
    anchor_ms: int,
    window_ms: int,
    factor: float,
    progress: Any,
) -> tuple[Tally, Population, int, dict[str, Any]]:
    """One mix against fresh `prefetch api` and `prefetch worker` processes.

    Returns the tally, the compressed population it ran on, the window's real start, and
    notes (lateness of the driver, errors).
    """
    clients = _clients(redis_url)
    for client in {id(c): c for c in clients.values()}.values():
        await client.execute("FLUSHDB")
    settings = load_settings({**env, "REDIS_URL": redis_url}).with_overrides(
        db_hot=DBS["REDIS_DB_HOT"],
        db_warm=DBS["REDIS_DB_WARM"],
        db_queue=DBS["REDIS_DB_QUEUE"],
        db_metrics=DBS["REDIS_DB_METRICS"],
    )
    history_reads = sum(1 for r in population.reads if r.at < anchor_ms)
    # Room to record the history and start the services before the window opens.
    margin_ms = 30_000 + history_reads // 5
    start_ms = int(time.time() * 1000) + margin_ms
    real = compress(population, factor, anchor_ms, start_ms)
    # The compressed days must keep the population's weekdays (the profile's kinds of day):
    # local time = wall clock + offset, which maps the window's start to its virtual weekday.
    week = round(7 * 86_400_000 / factor)
    env = {**env, "PREDICTIVE_DAY_OFFSET": str((round(anchor_ms / factor) - start_ms) % week)}
    settings = settings.with_overrides(predictive_day_offset_ms=int(env["PREDICTIVE_DAY_OFFSET"]))
    end_ms = start_ms + round(window_ms / factor)
    # The driver holds the scheduler's lease until the window opens: the scheduler must not
    # tick on the history before then (the simulation's first tick is at the window's start).
    hold = Lease(clients["queue"], 600_000, "replay-driver")
    if not await hold.acquire():
        raise SystemExit("the scheduler lease is taken: another scheduler runs on this Redis")
    flushes = await replay_history(
        clients["metrics"],
        settings.with_overrides(enable_predictive=True),
        real.reads_between(0, start_ms),
        [u.id for u in real.users],
    )
    port = free_port()
    service = service_env(
        redis_url,
        **env,
        **upstreams,
        PREFETCH_SERVICE_PORT=port,
        PREFETCH_SERVICE_HOST="127.0.0.1",
        SERVICE_CERTIFICATE_TOKEN=TOKEN,
        PREFETCH_WORKER_COUNT=1,
        API_WORKERS=1,
        PREFETCH_METRICS_DIR=str(services.logs / f"metrics-{mix}"),
        SCHEDULER_LEASE_TTL=1000,  # followers poll every 250 ms: the first tick is on time
    )
    api_url = f"http://127.0.0.1:{port}"
    api = services.prefetch("api", service, name=f"api-{mix}")
    worker = services.prefetch("worker", service, name=f"worker-{mix}")
    tally = Tally(real, start_ms, end_ms, hour_ms=settings.predictive_hour_ms)
    try:
        wait_http(f"{api_url}/health/ready", api)
        wait = start_ms / 1000 - time.time()
        if wait < 1:
            raise SystemExit(f"{mix}: the history and the services took longer than {margin_ms} ms")
        progress(
            f"{mix}: {flushes} history flushes; window of {window_ms / 3_600_000:g} virtual h "
            f"starts in {wait:.0f} s, lasts {(end_ms - start_ms) / 1000:.0f} s"
        )
        fetches_before = await _fetches(upstreams["TIMELINE_SERVICE_URL"])
        await asyncio.sleep(wait)
        await hold.release()
        driver = Driver(real, tally, api_url, clients, settings.enable_event_triggered)
        await driver.run(start_ms, end_ms)
        # Let the last flushes (activity, metrics: once a second) land.
        await asyncio.sleep(3 * FLUSH_MS / 1000)
        metrics = await _metrics(api_url)
        tally.fetches = await _fetches(upstreams["TIMELINE_SERVICE_URL"]) - fetches_before
        tally.jobs_by_origin.update({o: n for o, n in metrics["prefetch"]["byOrigin"].items() if n})
        tally.usefulness = metrics["usefulness"]
        late = sorted(driver.late_ms)
        notes = {
            "errors": driver.errors,
            "lateSends": len(late),
            "maxLateMs": round(late[-1], 1) if late else 0,
            "alive": api.proc.poll() is None and worker.proc.poll() is None,
        }
    finally:
        services.stop(worker)
        services.stop(api)
        for client in {id(c): c for c in clients.values()}.values():
            await client.close()
    return tally, real, start_ms, notes


async def realtime(
    population: Population,
    env: dict[str, str],
    mixes: list[str],
    anchor_ms: int,
    window_ms: int,
    factor: float,
    upstream_ms: int,
    redis_url: str,
    progress: Any,
) -> dict[str, tuple[Tally, Population, int, dict[str, Any]]]:
    """Run each mix in turn against real processes (see the module docstring)."""
    compressed = scaled_env(env, factor)
    out: dict[str, tuple[Tally, Population, int, dict[str, Any]]] = {}
    with Services("replay") as services:
        upstreams = start_sandbox(services, redis_url, latency_ms=upstream_ms)
        for mix in mixes:
            out[mix] = await run_mix(
                services,
                redis_url,
                upstreams,
                mix_env(compressed, mix),
                mix,
                population,
                anchor_ms,
                window_ms,
                factor,
                progress,
            )
    return out

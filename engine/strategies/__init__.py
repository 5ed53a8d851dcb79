"""Prefetch strategies: activity-based and predictive, ticked by one leader per deployment.

Modules: `leader` (the Redis lease and its fence), `scheduler` (one tick), `runner` (the
tick loop under the lease), `sidecar` (the `prefetch: scheduler` child of the supervisor),
`activity` and `predictive` (the strategies, and `record_activity`, which the API's activity
flush calls), `events` (event-triggered refreshes: no tick, `POST /api/prefetch/events` calls
`refresh_or_invalidate`), `usefulness` (were prefetched entries read before they expired?),
`shards` (per-shard pipelined script calls).

Interface for callers other than the runner (the replay benchmark, tests), all in epoch
milliseconds and none reading a clock of its own in decision code:

- `Scheduler(settings, redis_by_role, JobQueue(redis["queue"]), stats).tick(now_ms, fence)`
  runs one whole tick as production does (fence None: no lease needed) and returns a
  TickReport; `plan(now_ms)` and `enqueue(batches, now_ms, fence)` are its two halves.
- `record_activity(metrics_redis, settings, users, now_ms)` records activity (and app opens
  for the predictive profile) as the API's flush does, and returns the opening users whose
  refresh an event deferred (`events.refresh_at_open` schedules those served from cache).
- `usefulness.count_reads(redis_by_role, {tier: users}, stats)` counts cache hits on
  prefetched entries; `usefulness.sweep(redis_by_role, now_ms, stats)` settles expired ones.
- `events.refresh_or_invalidate(cache, jobs, metrics, settings, users, now_ms, pending)`
  decides an event as the API does.
- `TimelineCache(..., clock=)` takes the clock whose time it writes to the expiry index.

Redis TTLs still run in real time: a virtual-time replay must scale TTLs to match, or read
coverage from the expiry index (which is what the tick does) rather than from key existence
(bench/replay deletes entries whose virtual expiry passed before anything looks at them).
To compress time, divide every time setting by one factor, PREDICTIVE_TTL and PREDICTIVE_HOUR
(the profile's hour, hence its day) included, and set PREDICTIVE_DAY_OFFSET so that the
compressed days keep their weekdays (bench/replay/realtime.py).
"""

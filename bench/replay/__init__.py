"""The replayed week: hit rate and cost of each strategy mix on a synthetic population.

`python -m bench.replay` (see README "Replaying a week" and tuning.md). Modules:

- `population`: the seeded synthetic users (habits, jitter, weekends, off-habit opens,
  joiners and leavers, posts and followers), and `compress` to map its time onto another;
- `simulation`: the policy simulation in virtual time on a real Redis, one DB per mix, all
  mixes at once from one recorded history; `mix_simulation`: one mix's run, driving the
  production strategy code (scheduler tick, activity recording, events, the guarded store,
  the worker's actor functions, usefulness);
- `realtime`: the same population against the real processes (`prefetch api`, `prefetch
  worker` with its scheduler, `prefetch sandbox`) over HTTP, time compressed by one factor;
- `oracle`: the ceiling (every future read known, each fetch just in time);
- `tally`: what is measured, the same way in both modes; `report`: tables and the PNG.

Nothing here re-implements a selection: what to prefetch, when, and for whom is decided by
engine/strategies as in production.
"""

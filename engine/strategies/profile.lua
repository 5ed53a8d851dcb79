-- The predictive profile, shared by record.lua and predict_due.lua (prepended to each).
-- A profile is a user's habits: at most MAX_HABITS entries "kind,weight,stamp,mean,var"
-- joined by ';'. A habit is a time of day at which the user opens the app on a kind of day
-- (0: Monday to Friday, 1: Saturday and Sunday, in local time: PREDICTIVE_DAY_OFFSET; the days of a kind share their opens,
-- so a week of history teaches a weekday habit five times). weight: the app opens it has
-- seen, each halved every half-life since (so habits change); stamp: the minute of its last
-- open; mean: the weighted mean minute of the day of its opens; var: their weighted variance
-- in minutes², which starts at PRIOR_VAR and learns the habit's own jitter.
-- An hour is PREDICTIVE_HOUR ms (a replay that compresses time shortens it), a minute a
-- sixtieth of it, a day 24 hours: each script calls read_params (below) first.
local HOUR = 3600000
local MINUTE = HOUR / 60
local DAY = 24 * HOUR
local DAY_MINUTES = 1440
local MAX_HABITS = 8
local MATCH = 90        -- minutes: an open this close to a habit's mean is that habit's
local PRIOR_VAR = 900   -- minutes²: a new habit's spread (30 min) until its opens teach it
local MIN_VAR = 25      -- minutes²: no habit is predicted tighter than 5 min
local OFFSET = 0        -- ms added to epoch time to get the users' local time

local function set_hour(ms, offset)
  HOUR = ms
  MINUTE = ms / 60
  DAY = 24 * ms
  OFFSET = offset
end

-- Day 0 of the epoch (1970-01-01) was a Thursday.
local function day_kind(day)
  if (day + 3) % 7 >= 5 then return 1 end
  return 0
end

local function decode(packed)
  local list = {}
  if not packed then return list end
  for k, w, t, m, v in string.gmatch(packed, '(%d),([^,;]+),(%d+),([^,;]+),([^,;]+)') do
    list[#list + 1] = {tonumber(k), tonumber(w), tonumber(t), tonumber(m), tonumber(v)}
  end
  return list
end

local function encode(list)
  local parts = {}
  for i, e in ipairs(list) do
    parts[i] = string.format('%d,%.4f,%d,%.1f,%.1f', e[1], e[2], e[3], e[4], e[5])
  end
  return table.concat(parts, ';')
end

local function weight_at(e, at, half_life)
  return e[2] * math.pow(0.5, (at - e[3] * MINUTE) / half_life)
end

-- A signed difference of minutes of the day, in (-720, 720].
local function circular(d)
  d = d % DAY_MINUTES
  if d > DAY_MINUTES / 2 then d = d - DAY_MINUTES end
  return d
end

-- One app open at `now`: the nearest habit of that kind of day within MATCH gains a weight
-- of 1 and pulls its mean and variance (exponentially weighted); else a new habit begins.
local function observe(list, now, half_life)
  local day = math.floor((now + OFFSET) / DAY)
  local kind = day_kind(day)
  local minute = (now + OFFSET - day * DAY) / MINUTE
  local stamp = math.floor(now / MINUTE)
  local best, nearest = nil, MATCH
  for _, e in ipairs(list) do
    if e[1] == kind then
      local d = math.abs(circular(minute - e[4]))
      if d <= nearest then best, nearest = e, d end
    end
  end
  if best then
    local w = weight_at(best, now, half_life) + 1
    local d = circular(minute - best[4])
    best[4] = (best[4] + d / w) % DAY_MINUTES
    best[5] = (1 - 1 / w) * (best[5] + d * d / w)
    best[2], best[3] = w, stamp
  else
    list[#list + 1] = {kind, 1, stamp, minute, PRIOR_VAR}
  end
  if #list > MAX_HABITS then  -- bounded memory: forget the weakest habit
    local weakest, lowest = 1, math.huge
    for i, e in ipairs(list) do
      local w = weight_at(e, now, half_life)
      if w < lowest then weakest, lowest = i, w end
    end
    table.remove(list, weakest)
  end
  return list
end

-- The window of the habit's next occurrence that ends after `after`: it opens `coverage`
-- standard deviations of the habit's start (its jitter and the error of its mean) before
-- the mean, at least `lead`, and closes as far after it, at least `hold`. Only a habit
-- whose weight, decayed to that occurrence, is at least `threshold` has one. Replies the
-- earliest such window of any habit (start, predicted open, end) or nil.
local function next_window(list, after, p)
  local best_start, best_open, best_end = nil, nil, nil
  local first_day = math.floor((after + OFFSET) / DAY) - 1
  for _, e in ipairs(list) do
    local sd = math.sqrt(math.max(e[5], MIN_VAR) * (1 + 1 / math.max(e[2], 1))) * MINUTE
    local before = math.max(p.lead, p.coverage * sd)
    local later = math.max(p.hold, p.coverage * sd)
    for day = first_day, first_day + 8 do
      if day_kind(day) == e[1] then
        local open = day * DAY + math.floor(e[4] * MINUTE) - OFFSET
        if open + later > after then
          if weight_at(e, open, p.half_life) >= p.threshold
              and (best_start == nil or open - before < best_start) then
            best_start, best_open, best_end = open - before, open, open + later
          end
          break
        end
      end
    end
  end
  return best_start, best_open, best_end
end

-- The first window ending after `now` that the user has not already opened the app in:
-- an open (`last`: the user's last activity) since the window began, or at most MATCH
-- before its predicted open (an early open of the same habit), has used that occurrence.
local function pending_window(list, now, last, p)
  local s, open, e = next_window(list, now, p)
  local guard = 0
  while s ~= nil and last >= math.min(s, open - MATCH * MINUTE) and guard < 16 do
    s, open, e = next_window(list, e, p)
    guard = guard + 1
  end
  return s, open, e
end

-- The profile's settings, PARAMS arguments from ARGV[first] in the order of
-- engine/strategies/activity.py `profile_args`: lead ms, hold ms, coverage, half-life ms,
-- threshold, hour ms, day offset ms. Sets the hour and offset; returns the rest.
local PARAMS = 7
local function read_params(first)
  local a = {}
  for i = 1, PARAMS do a[i] = tonumber(ARGV[first + i - 1]) end
  set_hour(a[6], a[7])
  return {lead = a[1], hold = a[2], coverage = a[3], half_life = a[4], threshold = a[5]}
end

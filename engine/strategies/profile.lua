-- The predictive profile, shared by record.lua and predict_due.lua (prepended to each).
-- A profile is at most MAX_BUCKETS entries "bucket,weight,updated minute,mean minute" joined
-- by ';': bucket is the hour of the week (0-167, weeks counted from the epoch, UTC), weight
-- the app opens seen in that hour, each halved every half-life since it was seen, and mean
-- minute the weighted mean minute of the hour at which they happened.
-- An hour is PREDICTIVE_HOUR ms (one hour; a replay that compresses time shortens it), a
-- minute a sixtieth of it and a week 168 of them: each script calls set_hour first.
local HOUR = 3600000
local MINUTE = HOUR / 60
local WEEK = 168 * HOUR
local MAX_BUCKETS = 24

local function set_hour(ms)
  HOUR = ms
  MINUTE = ms / 60
  WEEK = 168 * ms
end

local function decode(packed)
  local list = {}
  if not packed then return list end
  for b, w, t, m in string.gmatch(packed, '(%d+),([^,;]+),(%d+),([^,;]+)') do
    list[#list + 1] = {tonumber(b), tonumber(w), tonumber(t), tonumber(m)}
  end
  return list
end

local function encode(list)
  local parts = {}
  for i, e in ipairs(list) do
    parts[i] = string.format('%d,%.4f,%d,%.2f', e[1], e[2], e[3], e[4])
  end
  return table.concat(parts, ';')
end

local function weight_at(e, at, half_life)
  return e[2] * math.pow(0.5, (at - e[3] * MINUTE) / half_life)
end

-- One app open at `now`: its bucket gains a weight of 1 and pulls the mean minute.
local function observe(list, now, half_life)
  local bucket = math.floor((now % WEEK) / HOUR)
  local minute = (now % HOUR) / MINUTE
  local stamp = math.floor(now / MINUTE)
  local found = false
  for _, e in ipairs(list) do
    if e[1] == bucket then
      local w = weight_at(e, now, half_life) + 1
      e[4] = e[4] + (minute - e[4]) / w
      e[2], e[3] = w, stamp
      found = true
    end
  end
  if not found then list[#list + 1] = {bucket, 1, stamp, minute} end
  if #list > MAX_BUCKETS then  -- bounded memory: forget the weakest habit
    local weakest, lowest = 1, math.huge
    for i, e in ipairs(list) do
      local w = weight_at(e, now, half_life)
      if w < lowest then weakest, lowest = i, w end
    end
    table.remove(list, weakest)
  end
  return list
end

-- The earliest predicted open after `after`: the next time of some bucket's mean minute
-- whose weight, decayed to that time, is at least `threshold`; nil if none is.
local function next_open(list, after, half_life, threshold)
  local best = nil
  local week_start = math.floor(after / WEEK) * WEEK
  for _, e in ipairs(list) do
    local at = week_start + e[1] * HOUR + math.floor(e[4] * MINUTE)
    if at <= after then at = at + WEEK end
    if weight_at(e, at, half_life) >= threshold and (best == nil or at < best) then
      best = at
    end
  end
  return best
end

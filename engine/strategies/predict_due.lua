-- KEYS: predictive index, profile hash, activity index (one shard).
-- ARGV: now (epoch ms), horizon (epoch ms), the profile's PARAMS (profile.lua read_params).
-- For each user whose index time is at or before the horizon, finds the first habit window
-- (profile.lua) that has not ended and that the user has not already opened the app in:
-- one that has begun by the horizon makes the user wanted now (replied with the predicted
-- open; kept due, so the next tick looks again), a later one re-indexes the user at its
-- start; without one, the faded profile is forgotten.
local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local p = read_params(3)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)
local wanted = {}
for _, user in ipairs(due) do
  local last = tonumber(redis.call('ZSCORE', KEYS[3], user) or '0')
  local start, open = pending_window(decode(redis.call('HGET', KEYS[2], user)), now, last, p)
  if start == nil then
    redis.call('ZREM', KEYS[1], user)
    redis.call('HDEL', KEYS[2], user)
  else
    redis.call('ZADD', KEYS[1], start, user)
    if start <= horizon then
      wanted[#wanted + 1] = user
      wanted[#wanted + 1] = tostring(open)
    end
  end
end
return wanted

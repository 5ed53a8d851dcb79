-- KEYS: predictive index, profile hash (one shard).
-- ARGV: now (epoch ms), horizon (epoch ms), lead ms, hold ms, half-life ms, threshold,
--       hour ms.
-- For each user whose index time is at or before the horizon, recomputes the predicted open
-- from the profile (one up to `hold` ago still counts): inside [open - lead, open + hold] and
-- before the horizon the user is wanted now (replied, kept due); a later one is re-indexed
-- at open - lead; without one, the faded profile is forgotten.
local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local lead = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
local half_life = tonumber(ARGV[5])
local threshold = tonumber(ARGV[6])
set_hour(tonumber(ARGV[7]))
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon)
local wanted = {}
for _, user in ipairs(due) do
  local at = next_open(decode(redis.call('HGET', KEYS[2], user)), now - hold, half_life, threshold)
  if at == nil then
    redis.call('ZREM', KEYS[1], user)
    redis.call('HDEL', KEYS[2], user)
  else
    redis.call('ZADD', KEYS[1], at - lead, user)
    if at - lead <= horizon then
      wanted[#wanted + 1] = user
      wanted[#wanted + 1] = tostring(at)
    end
  end
end
return wanted

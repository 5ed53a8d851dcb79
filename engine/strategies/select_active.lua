-- KEYS: activity index, frequency hash (one shard).  ARGV: active since (epoch ms).
-- Trims users idle since before ARGV[1], then replies {user, last active, frequency, ...}
-- for the others: the cost is that of the shard's active (and newly idle) users.
local CHUNK = 1000
local since = tonumber(ARGV[1])
local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. since)
for i = 1, #idle, CHUNK do
  redis.call('HDEL', KEYS[2], unpack(idle, i, math.min(i + CHUNK - 1, #idle)))
end
if #idle > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. since) end
local active = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #active, 2 * CHUNK do
  local users = {}
  for j = i, math.min(i + 2 * CHUNK - 1, #active), 2 do users[#users + 1] = active[j] end
  local freq = redis.call('HMGET', KEYS[2], unpack(users))
  for k, user in ipairs(users) do
    out[#out + 1] = user
    out[#out + 1] = active[i + 2 * (k - 1) + 1]
    out[#out + 1] = freq[k] or '1'
  end
end
return out

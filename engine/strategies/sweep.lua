-- KEYS: expiry index, unread index, unread origins (one tier, one shard).
-- ARGV: now (epoch ms), unread grace ms, most marks to settle.
-- Trims expiry members whose time passed; settles the unread marks of entries that expired
-- more than the grace ago (a read just before expiry is flushed up to a second later) and
-- replies their origins: wasted prefetches.
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[2])),
                        'LIMIT', 0, tonumber(ARGV[3]))
local origins = {}
for i, user in ipairs(gone) do
  origins[i] = redis.call('HGET', KEYS[3], user) or 'schedule'
  redis.call('HDEL', KEYS[3], user)
end
if #gone > 0 then redis.call('ZREM', KEYS[2], unpack(gone)) end
return origins

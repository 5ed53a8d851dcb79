-- KEYS: unread index, unread origins (one tier, one shard).  ARGV: users a read served.
-- Clears their unread marks; replies the origins of the prefetches those reads used.
local out = {}
for _, user in ipairs(ARGV) do
  local origin = redis.call('HGET', KEYS[2], user)
  if origin then
    out[#out + 1] = origin
    redis.call('HDEL', KEYS[2], user)
    redis.call('ZREM', KEYS[1], user)
  end
end
return out

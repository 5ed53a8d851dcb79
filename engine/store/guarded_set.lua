-- KEYS: entry, generation, expiry index, unread index, unread origins.
-- ARGV: body, ttl ms, generation seen before the fetch, user id, expires at (epoch ms),
--       origin of the prefetch ('' when a read will serve the body at once: read-through).
-- Stores the entry and its expiry index member in one step, unless an invalidation bumped
-- the generation. Replies {1, origin of an unread entry this one replaced, or false} or {0}.
local g = redis.call('GET', KEYS[2])
if (g or '') ~= ARGV[3] then return {0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
local replaced = redis.call('HGET', KEYS[5], ARGV[4])
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
  redis.call('HSET', KEYS[5], ARGV[4], ARGV[6])
elseif replaced then
  redis.call('ZREM', KEYS[4], ARGV[4])
  redis.call('HDEL', KEYS[5], ARGV[4])
end
return {1, replaced}

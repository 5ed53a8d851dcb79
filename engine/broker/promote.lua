-- A delayed message whose eta has passed moves to its queue under the same id, in one step
-- (Dramatiq enqueues a copy under a new id, then acks the delayed one: two round trips, and a
-- pending mark that names the message would lose track of it).
-- KEYS: namespace.  ARGV: broker id, queue (without .DQ), message id, message without its eta.
local ns = KEYS[1]
local dq = ARGV[2] .. '.DQ'
if redis.call('SREM', ns .. ':__acks__.' .. ARGV[1] .. '.' .. dq, ARGV[3]) == 0 then
  return 0
end
redis.call('HDEL', ns .. ':' .. dq .. '.msgs', ARGV[3])
redis.call('HSET', ns .. ':' .. ARGV[2] .. '.msgs', ARGV[3], ARGV[4])
redis.call('RPUSH', ns .. ':' .. ARGV[2], ARGV[3])
return 1

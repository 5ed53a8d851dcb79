-- KEYS: lease, status hash, ticks hash.  ARGV: lease value, identity, then field, value pairs.
-- The tick report lands only while the lease is the reporter's (a stale leader reports nothing).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1

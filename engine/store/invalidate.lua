-- KEYS: entry, generation, expiry index, unread index, unread origins.  ARGV: gen ttl, user.
-- The generation moves first (a fetch in flight can no longer store), then the entry and its
-- index members go, in one step.
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
return 1

-- KEYS: lease, token counter.  ARGV: identity, ttl ms.
-- Takes a free lease under a new fencing token and replies its value; while the lease is
-- held, replies the ms it has left (-1: no expiry), so a follower can wake when it lapses.
local left = redis.call('PTTL', KEYS[1])
if left ~= -2 then return left end
local value = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2])
return value

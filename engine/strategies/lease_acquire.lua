-- KEYS: lease, token counter.  ARGV: identity, ttl ms.
-- Takes a free lease under a new fencing token; replies the lease value, or false if held.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
if redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2]) then return value end
return false

-- A fence that still holds for at least the margin: the key holds the value and will not
-- expire within margin ms (a key without expiry holds for good). Replies 1 or 0.
-- KEYS: fence key.  ARGV: value, margin ms.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[2]) then return 0 end
return 1

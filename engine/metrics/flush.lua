-- KEYS: today's metrics hash, the lifetime hash (one slot: the {m} tag).
-- ARGV: the day hash's expiry in s, then field, amount pairs.
-- Adds every amount to both hashes in one step. Under OOM the first HINCRBY is refused before
-- anything is written, so a refused flush changes nothing and is simply retried whole.
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1

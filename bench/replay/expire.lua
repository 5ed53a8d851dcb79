-- KEYS: a user's entry in one tier, that tier's expiry index (same shard).
-- ARGV: now (virtual epoch ms), user.
-- Virtual time for Redis TTLs: the replay's clock runs far ahead of Redis's, which keeps an
-- entry for its TTL in *real* time. An entry whose expiry (the index score the store script
-- wrote with the virtual clock) has passed, or whose member the tick's sweep already trimmed,
-- is deleted here, as Redis would have expired it by then. Replies the expiry, or nil.
local at = redis.call('ZSCORE', KEYS[2], ARGV[2])
if (not at) or tonumber(at) <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return false
end
return at

-- KEYS: activity index, frequency hash, profile hash, predictive index, changed index
--       (one shard).
-- ARGV: now (epoch ms), activity window ms, predictive (1/0), the profile's PARAMS
--       (profile.lua read_params), then the users seen active in this flush.
-- A user idle for a whole window (or never seen) is opening the app: a new session begins,
-- its frequency restarts at 1 and, with predictive on, its profile learns the open and the
-- predictive index gets the start of its next window not used by this open; a mark left by
-- a deferred event refresh is taken. Replies {app opens, users whose marks were taken...}.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local predictive = ARGV[3] == '1'
local p = read_params(4)
local opens = 0
local changed = {}
for i = 4 + PARAMS, #ARGV do
  local user = ARGV[i]
  local prev = redis.call('ZSCORE', KEYS[1], user)
  redis.call('ZADD', KEYS[1], 'GT', now, user)
  if prev and tonumber(prev) >= now - window then
    redis.call('HINCRBY', KEYS[2], user, 1)
  else
    opens = opens + 1
    redis.call('HSET', KEYS[2], user, 1)
    if redis.call('ZREM', KEYS[5], user) == 1 then changed[#changed + 1] = user end
    if predictive then
      local list = observe(decode(redis.call('HGET', KEYS[3], user)), now, p.half_life)
      redis.call('HSET', KEYS[3], user, encode(list))
      local start = pending_window(list, now, now, p)
      -- Without a prediction, look again in a week (to forget a profile that faded).
      redis.call('ZADD', KEYS[4], start or (now + 7 * DAY), user)
    end
  end
end
return {opens, changed}

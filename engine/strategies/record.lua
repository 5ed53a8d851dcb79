-- KEYS: activity index, frequency hash, profile hash, predictive index (one shard).
-- ARGV: now (epoch ms), activity window ms, predictive (1/0), half-life ms, threshold,
--       lead ms, hour ms, then the users seen active in this flush.
-- A user idle for a whole window (or never seen) is opening the app: a new session begins,
-- its frequency restarts at 1 and, with predictive on, its profile learns the open and the
-- predictive index gets its next predicted open. Replies the number of app opens.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local predictive = ARGV[3] == '1'
local half_life = tonumber(ARGV[4])
local threshold = tonumber(ARGV[5])
local lead = tonumber(ARGV[6])
set_hour(tonumber(ARGV[7]))
local opens = 0
for i = 8, #ARGV do
  local user = ARGV[i]
  local prev = redis.call('ZSCORE', KEYS[1], user)
  redis.call('ZADD', KEYS[1], 'GT', now, user)
  if prev and tonumber(prev) >= now - window then
    redis.call('HINCRBY', KEYS[2], user, 1)
  else
    opens = opens + 1
    redis.call('HSET', KEYS[2], user, 1)
    if predictive then
      local list = observe(decode(redis.call('HGET', KEYS[3], user)), now, half_life)
      redis.call('HSET', KEYS[3], user, encode(list))
      local at = next_open(list, now, half_life, threshold)
      -- Without a prediction, look again in a week (to forget a profile that faded).
      redis.call('ZADD', KEYS[4], at and (at - lead) or (now + WEEK), user)
    end
  end
end
return opens

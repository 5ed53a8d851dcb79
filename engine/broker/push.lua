-- KEYS: queue list, queue msgs[, fence, fence log].  ARGV: msg id, msg[, fence value, log size].
-- Writes a message as Dramatiq's enqueue does (body, then id on the queue); with a fence,
-- only while the fence key holds the fence value (a leader's lease). Replies 1, or 0 if fenced.
-- A fenced write is also noted in a capped log, `<fence value> <Redis time ms>`, newest first:
-- the record of which leader enqueued when (no two leases' enqueues may interleave).
if KEYS[3] then
  if redis.call('GET', KEYS[3]) ~= ARGV[3] then
    return 0
  end
  local now = redis.call('TIME')
  redis.call('LPUSH', KEYS[4], ARGV[3] .. ' ' .. now[1] .. string.format('%03d', math.floor(now[2] / 1000)))
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
return 1

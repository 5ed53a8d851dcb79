-- KEYS: queue list, queue msgs[, fence].  ARGV: msg id, msg[, fence value].
-- Writes a message as Dramatiq's enqueue does (body, then id on the queue); with a fence,
-- only while the fence key holds the fence value (a leader's lease). Replies 1, or 0 if fenced.
if KEYS[3] and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
return 1

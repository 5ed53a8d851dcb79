-- KEYS: pending, queue list, queue msgs.
-- ARGV: jobId, rank, priority, delay, msg id, msg, ttl, force ('1' or '0').
-- Replies {created, jobId, priority, delay}; created 2: the id is the pending job's, retry.
-- A pending job of equal or higher rank covers a new one, unless the new one is forced and
-- the pending one is not (a refresh after an event must fetch, not find the old entry fresh).
local cur = redis.call('HMGET', KEYS[1], 'jobId', 'rank', 'priority', 'delay', 'force')
if cur[1] and tonumber(cur[2]) >= tonumber(ARGV[2]) and (cur[5] == '1' or ARGV[8] ~= '1') then
  return {0, cur[1], cur[3], cur[4]}
end
if cur[1] == ARGV[1] then
  return {2, cur[1], cur[3], cur[4]}
end
redis.call('HSET', KEYS[1], 'jobId', ARGV[1], 'rank', ARGV[2], 'priority', ARGV[3],
           'delay', ARGV[4], 'force', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
redis.call('RPUSH', KEYS[2], ARGV[5])
return {1, ARGV[1], ARGV[3], ARGV[4]}

-- The pending mark of a job about to be published to RabbitMQ (engine/broker/rabbit_jobs.py).
-- KEYS: pending[, failed list].
-- ARGV: jobId, rank, priority, delay, msg id, lease ms, force ('1' | '0'), queue
--       [, failed record (a retry)]
-- Replies {created, jobId, priority, delay}: 1 marked under a short lease (publish now, then
-- confirm); 0 a pending job covers it (a retry's record is dropped: that job does the work);
-- 2 the id is the pending job's, retry with another; 3 the failed record is gone, or a
-- concurrent retry of it is publishing.
if KEYS[2] and not redis.call('LPOS', KEYS[2], ARGV[9]) then
  return {3, ARGV[1], ARGV[3], ARGV[4]}
end
local cur = redis.call('HMGET', KEYS[1], 'jobId', 'rank', 'priority', 'delay', 'force')
if KEYS[2] and cur[1] == ARGV[1] then
  return {3, ARGV[1], ARGV[3], ARGV[4]}
end
if cur[1] and tonumber(cur[2]) >= tonumber(ARGV[2]) and (cur[5] == '1' or ARGV[7] ~= '1') then
  if KEYS[2] then redis.call('LREM', KEYS[2], 1, ARGV[9]) end
  return {0, cur[1], cur[3], cur[4]}
end
if cur[1] == ARGV[1] then
  return {2, cur[1], cur[3], cur[4]}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'jobId', ARGV[1], 'rank', ARGV[2], 'priority', ARGV[3],
           'delay', ARGV[4], 'queue', ARGV[8], 'msg', ARGV[5], 'force', ARGV[7],
           'state', 'publishing')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, ARGV[1], ARGV[3], ARGV[4]}

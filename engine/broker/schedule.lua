-- KEYS: pending, queue list, queue msgs[, failed list].
-- ARGV: jobId, rank, priority, delay, msg id, msg, ttl, namespace, canonical queue,
--       force ('1' or '0')[, failed record to remove first (a retry)]
-- Replies {created, jobId, priority, delay}; created 2: the id is the pending job's, retry with
-- another; 3: the failed record is gone (a concurrent retry took it), nothing was queued.
-- A pending mark counts only while the message it names exists (waiting, delayed or running):
-- a mark whose message is gone (lost with a crashed Redis, flushed) must not swallow a schedule.
-- A pending job of equal or higher rank covers a new one, unless the new one is forced and
-- the pending one is not (a refresh after an event must fetch, not find the old entry fresh).
if KEYS[4] and redis.call('LREM', KEYS[4], 1, ARGV[11]) == 0 then
  return {3, ARGV[1], ARGV[3], ARGV[4]}
end
local cur = redis.call('HMGET', KEYS[1], 'jobId', 'rank', 'priority', 'delay', 'queue', 'msg',
                       'force')
if cur[1] and cur[6] then
  local base = ARGV[8] .. ':' .. cur[5]
  if redis.call('HEXISTS', base .. '.msgs', cur[6]) == 0
      and redis.call('HEXISTS', base .. '.DQ.msgs', cur[6]) == 0 then
    cur = {}
  end
elseif cur[1] then
  cur = {}  -- a mark that names no message (written by an older version): not proof of a job
end
if cur[1] and tonumber(cur[2]) >= tonumber(ARGV[2]) and (cur[7] == '1' or ARGV[10] ~= '1') then
  return {0, cur[1], cur[3], cur[4]}
end
if cur[1] == ARGV[1] then
  return {2, cur[1], cur[3], cur[4]}
end
-- No DEL first: HSET rewrites every field, and a DEL (a write Redis does not refuse under
-- OOM) would exempt the rest of the script from the OOM check: Redis lets a script that has
-- written go on writing. This way a schedule under OOM is refused whole.
redis.call('HSET', KEYS[1], 'jobId', ARGV[1], 'rank', ARGV[2], 'priority', ARGV[3],
           'delay', ARGV[4], 'queue', ARGV[9], 'msg', ARGV[5], 'force', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
redis.call('RPUSH', KEYS[2], ARGV[5])
return {1, ARGV[1], ARGV[3], ARGV[4]}

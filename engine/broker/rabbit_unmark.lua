-- The publish failed or its outcome is unknown: drop the mark if it is still this job's, so
-- that it cannot swallow schedules for a message that may not exist.
-- KEYS: pending.  ARGV: jobId.
if redis.call('HGET', KEYS[1], 'jobId') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0

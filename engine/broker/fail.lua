-- KEYS: pending, counter, failed list.  ARGV: jobId, encoded FailedJob, how many to keep.
if redis.call('HGET', KEYS[1], 'jobId') == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return redis.call('INCR', KEYS[2])

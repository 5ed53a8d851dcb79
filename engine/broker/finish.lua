-- KEYS: pending, counter.  ARGV: jobId.  Clears the user's pending mark if it is this job's.
if redis.call('HGET', KEYS[1], 'jobId') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('INCR', KEYS[2])

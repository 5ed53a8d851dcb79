-- The broker confirmed the job's message: its mark lives as long as a queued job may wait,
-- and a retried job leaves the failed list. A mark already gone (the job ran, or a higher
-- priority replaced it) stays gone.
-- KEYS: pending[, failed list].  ARGV: jobId, ttl ms[, failed record].
if KEYS[2] then redis.call('LREM', KEYS[2], 1, ARGV[3]) end
if redis.call('HGET', KEYS[1], 'jobId') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'queued')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0

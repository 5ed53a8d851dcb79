-- The outcomes of finished RabbitMQ messages, written before they are acknowledged
-- (engine/broker/rabbit_settle.py). Each delivery's outcome is written once: its marker is set
-- with it, and a delivery whose marker exists (its ack was lost, it came back) changes nothing.
-- KEYS: completed counter, failed counter, failed list, worker gauges.
-- ARGV: marker ttl ms, failed records kept, broker id, gauge, then per message:
--   marker key, op count, then the ops:
--     'clear' pending jobId            drop the user's pending mark if it is this job's
--     'move' pending jobId queue id    the job's next attempt is that message
--     'completed' n                    count n completed jobs
--     'failed' record                  count a failed job and keep its record (newest first)
-- Replies, per message in order, 1 if its outcome was written now, else 0 (written before).
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
local written = {}
local i = 5
while i <= #ARGV do
  local first = redis.call('SET', ARGV[i], '1', 'NX', 'PX', ARGV[1])
  local nops = tonumber(ARGV[i + 1])
  i = i + 2
  written[#written + 1] = first and 1 or 0
  for _ = 1, nops do
    local op = ARGV[i]
    if op == 'clear' then
      if first and redis.call('HGET', ARGV[i + 1], 'jobId') == ARGV[i + 2] then
        redis.call('DEL', ARGV[i + 1])
      end
      i = i + 3
    elseif op == 'move' then
      if first and redis.call('HGET', ARGV[i + 1], 'jobId') == ARGV[i + 2] then
        redis.call('HSET', ARGV[i + 1], 'queue', ARGV[i + 3], 'msg', ARGV[i + 4])
      end
      i = i + 5
    elseif op == 'completed' then
      if first then redis.call('INCRBY', KEYS[1], ARGV[i + 1]) end
      i = i + 2
    elseif op == 'failed' then
      if first then
        redis.call('LPUSH', KEYS[3], ARGV[i + 1])
        redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
        redis.call('INCR', KEYS[2])
      end
      i = i + 2
    else
      return redis.error_reply('rabbit_outcome.lua: unknown op ' .. tostring(op))
    end
  end
end
return written

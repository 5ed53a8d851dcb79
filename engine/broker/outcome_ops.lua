-- The outcome ops of one finished message, shared by settle.lua (Dramatiq's Redis broker) and
-- rabbit_outcome.lua (RabbitMQ): Redis scripts cannot require, so the loader prepends this
-- file to each (Script.load), and both brokers write a job's outcome the same way.
-- The ops, from ARGV[i] on:
--   'clear' pending jobId            drop the user's pending mark if it is this job's
--   'move' pending jobId queue id    the job's next attempt is that message
--   'completed' n                    count n completed jobs
--   'failed' record                  count a failed job and keep its record (newest first)
-- A script's own ops (settle.lua's 'push') go to `own(op, i, write)`, which returns the index
-- after the op, or nil for an op it does not know either.
-- Returns the index after the message's ops, or an error reply (a table) for an unknown op:
-- the caller returns that as it is.
local function apply_outcome_ops(i, nops, write, completed, failed, failed_list, kept, script, own)
  for _ = 1, nops do
    local op = ARGV[i]
    if op == 'clear' then
      if write and redis.call('HGET', ARGV[i + 1], 'jobId') == ARGV[i + 2] then
        redis.call('DEL', ARGV[i + 1])
      end
      i = i + 3
    elseif op == 'move' then
      if write and redis.call('HGET', ARGV[i + 1], 'jobId') == ARGV[i + 2] then
        redis.call('HSET', ARGV[i + 1], 'queue', ARGV[i + 3], 'msg', ARGV[i + 4])
      end
      i = i + 5
    elseif op == 'completed' then
      if write then redis.call('INCRBY', completed, ARGV[i + 1]) end
      i = i + 2
    elseif op == 'failed' then
      if write then
        redis.call('LPUSH', failed_list, ARGV[i + 1])
        redis.call('LTRIM', failed_list, 0, tonumber(kept) - 1)
        redis.call('INCR', failed)
      end
      i = i + 2
    else
      local after = own and own(op, i, write)
      if not after then
        return redis.error_reply(script .. ': unknown op ' .. tostring(op))
      end
      i = after
    end
  end
  return i
end

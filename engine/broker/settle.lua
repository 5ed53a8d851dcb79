-- Settles finished messages: each one's outcome and its acknowledgement in one atomic step, so
-- that a message is never acknowledged without its outcome (stored, requeued, failed-listed).
-- KEYS: namespace, completed counter, failed counter, failed list.
-- ARGV: broker id, now ms, failed records kept, then per message:
--   verb ('ack' | 'nack' | 'back'), queue, message id, op count, then the ops:
--     'push' queue id data     enqueue a message as Dramatiq's enqueue does
--     and the outcome ops 'clear', 'move', 'completed', 'failed' (outcome_ops.lua, prepended
--     to this script).
-- A message's ops apply only if the message is still this worker's (SREM from its ack set):
-- one that was handed to another worker meanwhile is settled by that one, and counted once.
-- Replies, per message in order, 1 if it was still this worker's (settled here), else 0.
local ns = KEYS[1]

-- 'push' is this script's own op (only the Redis broker pushes messages).
local function push(op, i, write)
  if op ~= 'push' then return nil end
  if write then
    redis.call('HSET', ns .. ':' .. ARGV[i + 1] .. '.msgs', ARGV[i + 2], ARGV[i + 3])
    redis.call('RPUSH', ns .. ':' .. ARGV[i + 1], ARGV[i + 2])
  end
  return i + 4
end

local settled = {}
local i = 4
while i <= #ARGV do
  local verb, queue, id, nops = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  local mine = redis.call('SREM', ns .. ':__acks__.' .. ARGV[1] .. '.' .. queue, id) == 1
  local msgs = ns .. ':' .. queue .. '.msgs'
  settled[#settled + 1] = mine and 1 or 0
  if mine then
    if verb == 'ack' then
      redis.call('HDEL', msgs, id)
    elseif verb == 'nack' then
      -- Dramatiq's dead-letter move; its DLQ never has a .DQ in its name.
      local xq = ns .. ':' .. string.gsub(queue, '%.DQ$', '') .. '.XQ'
      local data = redis.call('HGET', msgs, id)
      if data then
        redis.call('ZADD', xq, ARGV[2], id)
        redis.call('HSET', xq .. '.msgs', id, data)
        redis.call('HDEL', msgs, id)
      end
    elseif redis.call('HEXISTS', msgs, id) == 1 then -- 'back': Dramatiq's requeue
      redis.call('RPUSH', ns .. ':' .. queue, id)
    end
  end
  i = apply_outcome_ops(i, nops, mine, KEYS[2], KEYS[3], KEYS[4], ARGV[3], 'settle.lua', push)
  if type(i) == 'table' then return i end
end
return settled

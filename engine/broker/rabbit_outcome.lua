-- The outcomes of finished RabbitMQ messages, written before they are acknowledged
-- (engine/broker/rabbit_settle.py). Each delivery's outcome is written once: its marker is set
-- with it, and a delivery whose marker exists (its ack was lost, it came back) changes nothing.
-- KEYS: completed counter, failed counter, failed list, worker gauges.
-- ARGV: marker ttl ms, failed records kept, broker id, gauge, then per message:
--   marker key, op count, then the ops ('clear', 'move', 'completed', 'failed':
--   outcome_ops.lua, prepended to this script).
-- Replies, per message in order, 1 if its outcome was written now, else 0 (written before).
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
local written = {}
local i = 5
while i <= #ARGV do
  local first = redis.call('SET', ARGV[i], '1', 'NX', 'PX', ARGV[1])
  local nops = tonumber(ARGV[i + 1])
  i = i + 2
  written[#written + 1] = first and 1 or 0
  i = apply_outcome_ops(i, nops, first, KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'rabbit_outcome.lua')
  if type(i) == 'table' then return i end
end
return written

-- KEYS: namespace. ARGV: dead broker id, queue names... Same moves as Dramatiq's maintenance.
local ns = KEYS[1]
local moved = 0
for i = 2, #ARGV do
  local queue = ARGV[i]
  local acks = ns .. ':__acks__.' .. ARGV[1] .. '.' .. queue
  local ids = redis.call('SMEMBERS', acks)
  for _, id in ipairs(ids) do
    if redis.call('HEXISTS', ns .. ':' .. queue .. '.msgs', id) == 1 then
      redis.call('RPUSH', ns .. ':' .. queue, id)
      moved = moved + 1
    end
  end
  redis.call('DEL', acks)
end
redis.call('ZREM', ns .. ':__heartbeats__', ARGV[1])
return moved

-- Move parked tasks whose dependency deadline passed to `failing` (dependency_timeout).
-- KEYS[1] parked index (zset id -> deadline ms)
-- ARGV[1] key tag, ARGV[2] now ms, ARGV[3] max count
-- Returns a flat list: id, body, ...
local tag = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, t in ipairs(due) do
  redis.call('ZREM', KEYS[1], t)
  local parked_key = tag .. ':parked:' .. t
  local body = redis.call('GET', parked_key)
  if body then
    for _, d in ipairs(redis.call('SMEMBERS', tag .. ':deps:' .. t)) do
      redis.call('SREM', tag .. ':dependents:' .. d, t)
    end
    redis.call('DEL', parked_key, tag .. ':waiting:' .. t, tag .. ':deps:' .. t)
    redis.call('HSET', tag .. ':failing', t, body)
    table.insert(out, t)
    table.insert(out, body)
  end
end
return out

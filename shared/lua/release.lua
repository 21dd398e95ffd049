-- After a task's result is recorded: release or fail the tasks waiting on it.
-- Released bodies move to the `releasing` hash and failed ones to `failing`
-- until the scheduler has republished / reported them (crash-safe hand-off).
-- KEYS[1] the finished task's hash
-- ARGV[1] key tag, ARGV[2] finished task id, ARGV[3] its status, ARGV[4] now
-- Returns a flat list: 'release'|'fail', id, body, ...
local tag, id, status = ARGV[1], ARGV[2], ARGV[3]
local dependents_key = tag .. ':dependents:' .. id
local dependents = redis.call('SMEMBERS', dependents_key)
redis.call('DEL', dependents_key)
local out = {}
for _, t in ipairs(dependents) do
  local parked_key = tag .. ':parked:' .. t
  local body = redis.call('GET', parked_key)
  if body then
    local waiting = tag .. ':waiting:' .. t
    local action = nil
    if status == 'succeeded' then
      redis.call('SREM', waiting, id)
      if redis.call('SCARD', waiting) == 0 then action = 'release' end
    else
      action = 'fail'
    end
    if action then
      redis.call('DEL', parked_key, waiting, tag .. ':deps:' .. t)
      redis.call('ZREM', tag .. ':parked', t)
      if action == 'release' then
        redis.call('HSET', tag .. ':releasing', t, body)
        redis.call('HSET', tag .. ':task:' .. t, 'status', 'queued', 'updated_at', ARGV[4])
      else
        redis.call('HSET', tag .. ':failing', t, body)
      end
      table.insert(out, action)
      table.insert(out, t)
      table.insert(out, body)
    end
  end
end
return out

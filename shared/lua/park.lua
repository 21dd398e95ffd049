-- Check a task's dependencies, or park it until they are done: one atomic step,
-- so no completion can slip between the check and the park.
-- KEYS[1] this task's hash, KEYS[2..] the dependencies' task hashes
-- ARGV[1] key tag ("{prefix}"), ARGV[2] task id, ARGV[3] task body, ARGV[4] deadline (ms since epoch),
-- ARGV[5] now (rfc3339), ARGV[6..] dependency ids (same order as KEYS[2..])
-- Returns {'done', result} (already finished: re-report), {'ready'}, {'failed', dep_id},
--         {'cycle', dep_id}, or {'parked', n_pending}.
local tag, id = ARGV[1], ARGV[2]
local result = redis.call('HGET', KEYS[1], 'result')
if result then
  return {'done', result}
end
local pending = {}
for i = 2, #KEYS do
  local dep = ARGV[i + 4]
  if dep == id then
    return {'cycle', dep}
  end
  local status = redis.call('HGET', KEYS[i], 'status')
  if status == 'failed' then
    -- Kept so that replaying the dependency revives this task (revive.lua).
    redis.call('SADD', tag .. ':failed_because:' .. dep, id)
    redis.call('HSET', KEYS[1], 'parked_body', ARGV[3], 'failed_because', dep)
    return {'failed', dep}
  elseif status ~= 'succeeded' then
    table.insert(pending, dep)
  end
end
if #pending == 0 then
  return {'ready'}
end
-- A cycle through tasks that are themselves waiting: walk their dependencies.
local seen, stack, steps = {}, {}, 0
for _, d in ipairs(pending) do table.insert(stack, d) end
while #stack > 0 and steps < 10000 do
  local d = table.remove(stack)
  steps = steps + 1
  if d == id then
    return {'cycle', pending[1]}
  end
  if not seen[d] then
    seen[d] = true
    for _, next in ipairs(redis.call('SMEMBERS', tag .. ':deps:' .. d)) do
      table.insert(stack, next)
    end
  end
end
local waiting = tag .. ':waiting:' .. id
redis.call('DEL', waiting)
for _, d in ipairs(pending) do
  redis.call('SADD', waiting, d)
  redis.call('SADD', tag .. ':dependents:' .. d, id)
  redis.call('SADD', tag .. ':deps:' .. id, d)
end
redis.call('SET', tag .. ':parked:' .. id, ARGV[3])
redis.call('ZADD', tag .. ':parked', ARGV[4], id)
redis.call('HSET', KEYS[1], 'status', 'waiting', 'updated_at', ARGV[5])
return {'parked', tostring(#pending)}

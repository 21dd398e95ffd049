-- Claim a task for one execution attempt.
-- KEYS[1] task hash, KEYS[2] task lock, KEYS[3] fence counter, KEYS[4] ledger hash,
-- KEYS[5..] resource locks of the task's lock_keys
-- ARGV[1] lock token, ARGV[2] lease ms, ARGV[3] worker id, ARGV[4] kind, ARGV[5] now (rfc3339),
-- ARGV[6] key tag, ARGV[7] task body ('' when the task has no lock_keys),
-- ARGV[8..] the lock_keys names (same order as KEYS[5..])
-- Returns {'done', result_json} when a result is already stored (re-report it, no GPU call),
--         {'busy'} when another attempt holds the task itself (a duplicate delivery),
--         {'queued', key} when another task holds one of its lock keys: the body joins that
--         key's wait list (FIFO) and is handed back to the queue when the key is unlocked
--         (unlock.lua) or, if its holder died, when the lease ran out (wake.lua);
--         {'run', fence} when this attempt owns the task and all its lock keys;
--         the fence only ever grows.
local result = redis.call('HGET', KEYS[1], 'result')
if result then
  return {'done', result}
end
-- All or nothing: the task lock and every resource lock.
for i = 2, #KEYS do
  if i == 2 or i >= 5 then
    local holder = redis.call('GET', KEYS[i])
    if holder and holder ~= ARGV[1] then
      if i >= 5 and ARGV[7] ~= '' then
        local name = ARGV[i + 3]
        redis.call('RPUSH', ARGV[6] .. ':lockwait:' .. name, ARGV[7])
        redis.call('ZADD', ARGV[6] .. ':lockwaits', 0, name)
        redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[5])
        return {'queued', name}
      end
      return {'busy'}
    end
  end
end
for i = 2, #KEYS do
  if i == 2 or i >= 5 then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
  end
end
-- The fence grows even across a Redis restart that lost the counter: it is at
-- least the server clock in microseconds.
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
local fence = math.max(current + 1, floor)
redis.call('SET', KEYS[3], string.format('%.0f', fence))
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'kind', ARGV[4],
  'fence', string.format('%.0f', fence), 'updated_at', ARGV[5])
redis.call('HINCRBY', KEYS[4], 'attempts', 1)
return {'run', string.format('%.0f', fence)}

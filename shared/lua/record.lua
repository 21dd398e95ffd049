-- The scheduler records a result once per task id and, in the same step,
-- releases or fails the tasks waiting on it (one round trip per result).
-- Released bodies move to the `releasing` hash and failed ones to `failing`
-- until the scheduler has republished / reported them (crash-safe hand-off).
-- KEYS[1] task hash
-- ARGV[1] status, ARGV[2] result json, ARGV[3] now, ARGV[4] record token (one per delivery),
-- ARGV[5] key tag, ARGV[6] task id, ARGV[7] how long to keep the task's state
-- once recorded, in ms (0 = for ever)
-- Returns {first, 'release'|'fail', id, body, ...}: first is 1 when this is the
-- first record of the task's result, 0 for a duplicate. A retry with the same
-- token (its first reply was lost with the connection) gets 1 again, so "first"
-- is decided exactly once even when replies are lost. Dependents are released
-- on duplicates too (idempotent: their set is gone once released).
local first = '1'
if redis.call('HGET', KEYS[1], 'recorded') == '1' then
  if redis.call('HGET', KEYS[1], 'recorded_by') ~= ARGV[4] then
    first = '0'
  end
else
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'recorded', '1', 'recorded_by', ARGV[4], 'updated_at', ARGV[3])
  if not redis.call('HGET', KEYS[1], 'result') then
    redis.call('HSET', KEYS[1], 'result', ARGV[2])
  end
end

local out = {first}
local tag, id = ARGV[5], ARGV[6]
-- The recorded status decides, not this delivery's (they agree unless a producer forged one).
local status = redis.call('HGET', KEYS[1], 'status')
-- Retention: from its record on, the task's state lives ARGV[7] ms more (renewed by a
-- re-record after a replay). A failed_because set goes with the last failed dependent
-- that names it (revive.lua cannot revive a task whose state is gone anyway).
local keep = tonumber(ARGV[7]) or 0
if keep > 0 then
  redis.call('PEXPIRE', KEYS[1], keep)
  redis.call('PEXPIRE', tag .. ':ledger:' .. id, keep)
  local because = status == 'failed' and redis.call('HGET', KEYS[1], 'failed_because')
  if because then
    redis.call('PEXPIRE', tag .. ':failed_because:' .. because, keep)
  end
end
local dependents_key = tag .. ':dependents:' .. id
local dependents = redis.call('SMEMBERS', dependents_key)
if #dependents == 0 then
  return out
end
redis.call('DEL', dependents_key)
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
        redis.call('HSET', tag .. ':task:' .. t, 'status', 'queued', 'updated_at', ARGV[3])
      else
        redis.call('HSET', tag .. ':failing', t, body)
        -- Kept so that replaying this task revives the dependent (revive.lua).
        redis.call('SADD', tag .. ':failed_because:' .. id, t)
        redis.call('HSET', tag .. ':task:' .. t, 'parked_body', body, 'failed_because', id)
        if keep > 0 then
          redis.call('PEXPIRE', tag .. ':failed_because:' .. id, keep)
        end
      end
      table.insert(out, action)
      table.insert(out, t)
      table.insert(out, body)
    end
  end
end
return out

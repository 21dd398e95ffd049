-- After an operator's replay reopened a failed task (reopen.lua): the tasks
-- that failed with `dependency_failed` because of it, and transitively the
-- ones that failed because of those, are reopened as reopen.lua does and handed to
-- the scheduler's `releasing` hash, which republishes them (crash-safe, as
-- any release). Republished, each parks again on the dependency that now runs.
-- A dependent whose failure is not stored yet (the worker was reporting it as
-- this ran) is left as it is: it stays in the set, for a later replay.
-- KEYS[1] the reopened task's hash (routes the call; every key shares its tag)
-- ARGV[1] key tag, ARGV[2] id of the reopened task, ARGV[3] now (rfc3339)
-- Returns the revived ids.
local tag = ARGV[1]
local revived, queue, seen = {}, {ARGV[2]}, {}
while #queue > 0 do
  local failed = table.remove(queue, 1)
  local because = tag .. ':failed_because:' .. failed
  for _, t in ipairs(redis.call('SMEMBERS', because)) do
    local task = tag .. ':task:' .. t
    local body = redis.call('HGET', task, 'parked_body')
    local result = redis.call('HGET', task, 'result')
    if not seen[t] and body and result and redis.call('HGET', task, 'status') == 'failed' then
      seen[t] = true
      reopen_failed(task, tag .. ':ledger:' .. t, result, ARGV[3])
      redis.call('HSET', tag .. ':releasing', t, body)
      redis.call('SREM', because, t)
      table.insert(revived, t)
      table.insert(queue, t)
    end
  end
end
return revived

-- Store a task's result: the one idempotent effect path, fenced.
-- KEYS[1] task hash, KEYS[2] task lock, KEYS[3] ledger hash
-- ARGV[1] lock token, ARGV[2] fence, ARGV[3] status, ARGV[4] result json, ARGV[5] now
-- Returns {'applied'}, {'exists', stored_result} (someone finished first: report theirs),
--         or {'fenced'} (a newer attempt owns the task: apply nothing).
-- An attempt whose fence is no longer the newest is counted as fenced in the ledger
-- whichever way it ends, so a late worker's refused work is always visible.
local stale = redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2]
if stale then
  redis.call('HINCRBY', KEYS[3], 'fenced', 1)
end
local stored = redis.call('HGET', KEYS[1], 'result')
if stored then
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
  return {'exists', stored}
end
if stale then
  return {'fenced'}
end
redis.call('HSET', KEYS[1], 'result', ARGV[4], 'status', ARGV[3], 'updated_at', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'applies', 1)
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return {'applied'}

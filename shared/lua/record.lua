-- The scheduler records a result once per task id.
-- KEYS[1] task hash
-- ARGV[1] status, ARGV[2] result json, ARGV[3] now, ARGV[4] record token (one per delivery)
-- Returns 1 when this is the first record of the task's result, 0 for a duplicate.
-- A retry with the same token (its first reply was lost with the connection)
-- gets 1 again, so "first" is decided exactly once even when replies are lost.
if redis.call('HGET', KEYS[1], 'recorded') == '1' then
  if redis.call('HGET', KEYS[1], 'recorded_by') == ARGV[4] then
    return 1
  end
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'recorded', '1', 'recorded_by', ARGV[4], 'updated_at', ARGV[3])
if not redis.call('HGET', KEYS[1], 'result') then
  redis.call('HSET', KEYS[1], 'result', ARGV[2])
end
return 1

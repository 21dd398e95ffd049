-- Prepended to reopen.lua and revive.lua when they are loaded (store::Scripts):
-- set a failed task's result aside so that it runs again.
local function reopen_failed(task, ledger, result, now)
  redis.call('HSET', task, 'previous_result', result, 'status', 'queued', 'updated_at', now)
  redis.call('HDEL', task, 'result', 'recorded', 'recorded_by', 'parked_body', 'failed_because',
    'claim', 'takeovers')
  redis.call('HINCRBY', ledger, 'replays', 1)
end

-- An operator replays a dead letter: a task whose stored result is `failed`
-- may run again (that is what a replay asks for); a succeeded one may not (its
-- effect is applied: the replay re-reports it without a GPU call).
-- KEYS[1] task hash, KEYS[2] ledger hash; ARGV[1] now (rfc3339)
-- Returns 'reopened' (the failed result moved to `previous_result`, the
-- scheduler's record cleared so the new outcome is recorded), 'kept' (a
-- succeeded result stays), or 'none' (nothing stored: the replay simply runs).
local result = redis.call('HGET', KEYS[1], 'result')
if not result then
  return 'none'
end
if redis.call('HGET', KEYS[1], 'status') ~= 'failed' then
  return 'kept'
end
reopen_failed(KEYS[1], KEYS[2], result, ARGV[1])
return 'reopened'

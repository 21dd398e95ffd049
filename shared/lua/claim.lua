-- Claim a task for one execution attempt.
-- KEYS[1] task hash, KEYS[2] task lock, KEYS[3] fence counter, KEYS[4] ledger hash,
-- KEYS[5..] resource locks of the task's lock_keys
-- ARGV[1] lock token, ARGV[2] lease ms, ARGV[3] worker id, ARGV[4] kind, ARGV[5] now (rfc3339),
-- ARGV[6] key tag, ARGV[7] task body ('' when the task has no lock_keys),
-- ARGV[8] takeovers after which the task is given up (0: never),
-- ARGV[9..] the lock_keys names (same order as KEYS[5..])
-- Returns {'done', result_json} when a result is already stored (re-report it, no GPU call),
--         {'busy'} when another attempt holds the task itself (a duplicate delivery),
--         {'queued', key} when another task holds one of its lock keys: the body joins that
--         key's wait list (FIFO) and is handed back to the queue when the key is unlocked
--         (unlock.lua) or, if its holder died, when the lease ran out (wake.lua);
--         {'run', fence} when this attempt owns the task and all its lock keys;
--         the fence only ever grows;
--         {'abandoned', fence, n} like 'run', but the attempts before this one ended n times
--         without a word (no finish, no unlock: their worker died, or froze past its lease)
--         and n reached ARGV[8]: the task is taken to kill its workers, and is not to be run.
-- The hash's `claim` field holds the token of the attempt that owns the task; unlock.lua
-- clears it when that attempt lets go. Found set to another token when the lock is free,
-- it means that attempt was abandoned: a takeover. Once a result is stored it is never
-- read again (the 'done' answer comes first), until a replay clears it (reopen_failed.lua).
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
        local name = ARGV[i + 4]
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
local takeovers = 0
local previous = redis.call('HGET', KEYS[1], 'claim')
if previous and previous ~= ARGV[1] then
  takeovers = redis.call('HINCRBY', KEYS[1], 'takeovers', 1)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'kind', ARGV[4],
  'fence', string.format('%.0f', fence), 'updated_at', ARGV[5], 'claim', ARGV[1])
redis.call('HINCRBY', KEYS[4], 'attempts', 1)
local limit = tonumber(ARGV[8]) or 0
if limit > 0 and takeovers >= limit then
  return {'abandoned', string.format('%.0f', fence), tostring(takeovers)}
end
return {'run', string.format('%.0f', fence)}

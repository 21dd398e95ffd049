-- Release locks only where we still hold them (compare-and-delete on the token),
-- and wake the first waiter of each resource lock released: its body moves to
-- the `releasing` hash (crash-safe hand-off) and is returned for republishing.
-- KEYS[1] the task lock, KEYS[2..n-1] resource locks, KEYS[n] the task hash
-- ARGV[1] token, ARGV[2] key tag, ARGV[3] now (rfc3339),
-- ARGV[4..] resource lock names (same order as KEYS[2..])
-- Returns {released_count, id, body, id, body, ...}.
-- An attempt that lets go of its task before a result (a retry through a delay queue,
-- a hand-back) clears its `claim` (claim.lua), so the next claim is no takeover, and
-- the task is `queued` again until an attempt claims it.
local tag = ARGV[2]
local n = 0
local out = {}
local task = KEYS[#KEYS]
if redis.call('HGET', task, 'claim') == ARGV[1] then
  redis.call('HDEL', task, 'claim')
  redis.call('HSET', task, 'status', 'queued', 'updated_at', ARGV[3])
end
for i = 1, #KEYS - 1 do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    n = n + redis.call('DEL', KEYS[i])
    if i >= 2 then
      local name = ARGV[i + 2]
      local list = tag .. ':lockwait:' .. name
      local body = redis.call('LPOP', list)
      if body then
        local ok, task = pcall(cjson.decode, body)
        if ok and type(task) == 'table' and type(task.id) == 'string' then
          redis.call('HSET', tag .. ':releasing', task.id, body)
          table.insert(out, task.id)
          table.insert(out, body)
        end
      end
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', tag .. ':lockwaits', name)
      end
    end
  end
end
table.insert(out, 1, tostring(n))
return out

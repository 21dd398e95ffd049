-- Wake waiters of resource locks that nobody holds any more: the holder died
-- and its lease ran out, or a wake-up was missed. One waiter per free key
-- moves to the `releasing` hash; the scheduler republishes it.
-- KEYS[1] the lockwaits zset, KEYS[2] the releasing hash
-- ARGV[1] key tag, ARGV[2] max keys to look at
-- Returns the number of waiters woken.
local tag = ARGV[1]
local woken = 0
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  local list = tag .. ':lockwait:' .. name
  if redis.call('EXISTS', tag .. ':lock:res:' .. name) == 0 then
    local body = redis.call('LPOP', list)
    if body then
      local ok, task = pcall(cjson.decode, body)
      if ok and type(task) == 'table' and type(task.id) == 'string' then
        redis.call('HSET', KEYS[2], task.id, body)
        woken = woken + 1
      end
    end
  end
  if redis.call('LLEN', list) == 0 then
    redis.call('ZREM', KEYS[1], name)
  end
end
return woken

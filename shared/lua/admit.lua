-- Fleet-wide cap on GPU requests in flight: a semaphore of leases that expire,
-- so a killed worker's permits come back by themselves.
-- KEYS[1] zset token -> lease expiry (ms)
-- ARGV[1] token, ARGV[2] cap, ARGV[3] lease ms
-- Returns 1 when admitted, 0 when the cap is reached.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0

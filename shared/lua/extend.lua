-- Extend leases only if we still hold every one (compare-and-pexpire).
-- KEYS: locks, ARGV[1] token, ARGV[2] lease ms. Returns 1 when all extended, 0 when any was lost.
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return 1

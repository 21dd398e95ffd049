-- Release locks only where we still hold them (compare-and-delete on the token).
-- KEYS: locks, ARGV[1] token. Returns how many were released.
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    n = n + redis.call('DEL', KEYS[i])
  end
end
return n

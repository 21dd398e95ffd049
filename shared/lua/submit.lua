-- Register a submitted task unless its id is already known.
-- KEYS[1] task hash; ARGV[1] kind, ARGV[2] now. Returns 1 when new, 0 when known.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'kind', ARGV[1], 'submitted_at', ARGV[2], 'updated_at', ARGV[2])
return 1

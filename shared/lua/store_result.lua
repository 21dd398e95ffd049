-- Store a result decided outside a worker attempt (dependency failure or
-- timeout) unless the task already has one. Returns the stored result:
-- ours when we stored it, the earlier one otherwise.
-- KEYS[1] task hash, KEYS[2] ledger; ARGV[1] status, ARGV[2] result json, ARGV[3] now
local stored = redis.call('HGET', KEYS[1], 'result')
if stored then
  return stored
end
redis.call('HSET', KEYS[1], 'result', ARGV[2], 'status', ARGV[1], 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'applies', 1)
return ARGV[2]

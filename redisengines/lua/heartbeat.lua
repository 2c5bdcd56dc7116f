-- heartbeat: renew an engine's lease and publish its state.
-- KEYS[1] P:{e<id>}:hb   KEYS[2] P:engines
-- ARGV[1] engine id   ARGV[2] lease TTL (ms)   ARGV[3] engine info JSON
-- Returns: 1, or 0 when the lease had already expired: the engine is presumed dead by
-- everyone else and must not go on as this id.
if not redis.call('SET', KEYS[1], '1', 'XX', 'PX', ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1

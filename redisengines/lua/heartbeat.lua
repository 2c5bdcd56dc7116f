-- heartbeat: renew an engine's lease and publish its state.
-- KEYS[1] P:{e<id>}:hb   KEYS[2] P:engines
-- ARGV[1] engine id   ARGV[2] lease TTL (ms)   ARGV[3] engine info JSON
-- PEXPIRE is allowed when the server is out of memory (SET is not), so a full server does
-- not make engines lose their leases; the state update is best effort.
-- Returns: 1, or 0 when the lease had already expired: the engine is presumed dead by
-- everyone else and must not go on as this id.
if redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 0 then
  return 0
end
redis.pcall('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1

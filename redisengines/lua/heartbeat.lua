-- heartbeat: renew an engine's lease and publish its state.
-- KEYS[1] P:{e<id>}:hb   KEYS[2] P:engines   KEYS[3] P:{e<id>}:fenced
-- ARGV[1] engine id   ARGV[2] lease TTL (ms)   ARGV[3] engine info JSON, to which
-- `beat` (this renewal's Redis time, in seconds) is added
-- The decision that an engine is dead is retire.lua's (it sets the fence), not the lease's
-- expiry: a lease that lapsed while the server was frozen or paused is taken up again if
-- nobody retired the engine meanwhile. PEXPIRE is allowed at maxmemory (SET is not).
-- Returns: the Redis time in milliseconds (the engine keeps its clock offset from it); 0 when
-- the engine was retired, or its registration is gone (the server lost its state): it must
-- not go on under this id.
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return 0
end
if redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 0 then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
end
local now = redis.call('TIME')
local ok, info = pcall(cjson.decode, ARGV[3])
if ok and type(info) == 'table' then
  info['beat'] = tonumber(now[1]) + math.floor(tonumber(now[2]) / 1000) / 1000
  redis.pcall('HSET', KEYS[2], ARGV[1], cjson.encode(info))
end
return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

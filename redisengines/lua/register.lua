-- register: hand out a fresh engine id and create its inbox, lease and registry entry.
-- KEYS[1] P:next_id   KEYS[2] P:engines   KEYS[3] P:events   KEYS[4] P:tasks
-- KEYS[5] P:epoch   KEYS[6] P:server
-- ARGV[1] prefix P    ARGV[2] lease TTL (ms)   ARGV[3] engine info JSON (without id)
-- ARGV[4] a fresh random token: the cluster's epoch if it has none yet
-- Per-engine key names are derived from the new id here, since the id is only known here.
-- Returns: the new engine id. Ids are never reused, so a dead engine cannot come back as itself.
redis.call('SET', KEYS[5], ARGV[4], 'NX')
if redis.call('EXISTS', KEYS[6]) == 0 then  -- a first registration is no restart (retire.lua)
  local ok, info = pcall(redis.call, 'INFO', 'server')
  local run = ok and string.match(info, 'run_id:(%w+)')
  if run then redis.call('SET', KEYS[6], run .. ' 0') end
end
local id = redis.call('INCR', KEYS[1]) - 1
local tag = ARGV[1] .. ':{e' .. id .. '}'
redis.call('DEL', tag .. ':inbox', tag .. ':ctl', tag .. ':ns', tag .. ':done', tag .. ':fenced')
redis.call('XGROUP', 'CREATE', tag .. ':inbox', 'engine', '$', 'MKSTREAM')
-- The shared task stream has the same group name, so one XREADGROUP reads both.
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[4], 'engine', '0', 'MKSTREAM')
redis.call('SET', tag .. ':hb', '1', 'PX', ARGV[2])
local info = cjson.decode(ARGV[3])
info['id'] = id
redis.call('HSET', KEYS[2], id, cjson.encode(info))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'event', 'registered', 'engine', id)
return id

-- retire: take an engine out of service and fail every command it still holds.
-- KEYS[1] P:engines   KEYS[2] P:events   KEYS[3] P:{e<id>}:inbox   KEYS[4] P:{e<id>}:hb
-- KEYS[5] P:{e<id>}:ctl   KEYS[6..] other per-engine keys to delete (ns, done)
-- ARGV[1] engine id   ARGV[2] mode: 'reap' (only if the lease expired), 'kill', 'shutdown'
-- ARGV[3] prefix P (result and reply keys are named after the entries' own fields)
-- ARGV[4] result TTL (ms)   ARGV[5] the serialized None, the value of a kill command
-- Commands that were delivered (in the PEL) fail with started=true, the others with
-- started=false; kill commands waiting in ctl succeed (the engine is gone either way).
-- 'reap' leaves the engine in P:engines with state "dead"; the others remove it.
-- Returns: the number of commands failed, or -1 when 'reap' found the lease still alive.
local id = ARGV[1]
local mode = ARGV[2]
if mode == 'reap' and redis.call('EXISTS', KEYS[4]) == 1 then
  return -1
end
local started = {}
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[3], 'engine', '-', '+', 1000000)
if ok then
  for _, p in ipairs(pending) do started[p[1]] = true end
end
local errtype = 'EngineDiedError'
local why = 'died (its heartbeat lease expired)'
if mode ~= 'reap' then
  errtype = 'EngineShutdownError'
  why = (mode == 'kill') and 'was killed' or 'shut down'
end
local failed = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[3], '-', '+')) do
  do
    local f = {}
    local kv = entry[2]
    for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
    local cmd = f['id']
    if cmd then
      local was = started[entry[1]] == true
      local msg = 'engine ' .. id .. ' ' .. why .. (was and ' while running ' or ' before starting ')
        .. (f['op'] or 'a') .. ' command ' .. cmd
      local err = cjson.encode({kind = 'system', type = errtype, message = msg,
        attrs = {engine_id = tonumber(id), started = was, cmd_id = cmd}})
      local rkey = ARGV[3] .. ':{r' .. cmd .. '}'
      redis.call('HSET', rkey, 'status', 'error', 'error', err, 'engine', id, 'op', f['op'] or '')
      redis.call('PEXPIRE', rkey, ARGV[4])
      if f['client'] then
        local rep = ARGV[3] .. ':{c' .. f['client'] .. '}:replies'
        redis.call('XADD', rep, '*', 'id', cmd, 'status', 'error', 'error', err, 'engine', id)
        redis.call('PEXPIRE', rep, ARGV[4])
      end
      failed = failed + 1
    end
  end
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[5], '-', '+')) do
  local f = {}
  local kv = entry[2]
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  if f['op'] == 'kill' and f['id'] then
    local rkey = ARGV[3] .. ':{r' .. f['id'] .. '}'
    redis.call('HSET', rkey, 'status', 'ok', 'value', ARGV[5], 'engine', id, 'op', 'kill')
    redis.call('PEXPIRE', rkey, ARGV[4])
    if f['client'] then
      local rep = ARGV[3] .. ':{c' .. f['client'] .. '}:replies'
      redis.call('XADD', rep, '*', 'id', f['id'], 'status', 'ok', 'value', ARGV[5], 'engine', id)
      redis.call('PEXPIRE', rep, ARGV[4])
    end
  end
end
redis.call('DEL', KEYS[3], KEYS[4])
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
if mode == 'reap' then
  local info = redis.call('HGET', KEYS[1], id)
  if info then
    local decoded = cjson.decode(info)
    decoded['state'] = 'dead'
    redis.call('HSET', KEYS[1], id, cjson.encode(decoded))
  end
else
  redis.call('HDEL', KEYS[1], id)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'event', mode, 'engine', id, 'failed', failed)
return failed

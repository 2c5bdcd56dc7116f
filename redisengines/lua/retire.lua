-- retire: take an engine out of service and settle every command it still holds.
-- KEYS[1] P:engines   KEYS[2] P:events   KEYS[3] P:{e<id>}:inbox   KEYS[4] P:{e<id>}:hb
-- KEYS[5] P:{e<id>}:ctl   KEYS[6] P:tasks   KEYS[7] P:{e<id>}:fenced   KEYS[8] P:server
-- KEYS[9] P:dead   KEYS[10] P:{e<id>}:out (kept for a post-mortem, with a TTL)
-- KEYS[11..] other per-engine keys to delete
-- ARGV[1] engine id   ARGV[2] mode: 'reap' (only if the lease expired), 'kill', 'shutdown'
-- ARGV[3] prefix P (result and reply keys are named after the entries' own fields)
-- ARGV[4] result TTL (ms)   ARGV[5] grace after a server restart (ms)
-- Inbox commands that were delivered (in the PEL) fail with started=true, the others with
-- started=false. Tasks the engine held go back to P:tasks while their field `retries` is
-- above 0 (decremented, `died` counts the deaths), else fail with started=true; a task that
-- had been re-queued before is poison: PoisonCommandError, and a copy of its entry goes to
-- the dead-letter stream P:dead. Kill commands waiting in ctl succeed.
-- 'reap' leaves the engine in P:engines with state "dead"; the others remove it.
-- Returns: the number of commands failed, or -1 when 'reap' found the lease still alive.
local id = ARGV[1]
local mode = ARGV[2]
if mode == 'reap' then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    return -1
  end
  if redis.call('EXISTS', KEYS[7]) == 1 then
    return 0  -- retired already (another reaper came first): nothing to settle, no event
  end
  -- Leases expire at absolute times, so the downtime (and the AOF/RDB load) of a restarted
  -- server lapses them all. A lapsed lease is proof of death only once the engines have
  -- had ARGV[5] ms to renew it on this server run: P:server = '<run id> <first seen, ms>'.
  local ok, info = pcall(redis.call, 'INFO', 'server')
  local run = ok and string.match(info, 'run_id:(%w+)')
  if run then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local seen = redis.call('GET', KEYS[8])
    local seen_run, since = nil, nil
    if seen then seen_run, since = string.match(seen, '^(%w+) (%d+)$') end
    if seen_run ~= run then
      redis.call('SET', KEYS[8], run .. ' ' .. now)
      return -1
    end
    if now - tonumber(since) < tonumber(ARGV[5]) then
      return -1
    end
  end
end
local errtype = 'EngineDiedError'
local why = 'died (its heartbeat lease expired)'
if mode ~= 'reap' then
  errtype = 'EngineShutdownError'
  why = (mode == 'kill') and 'was killed' or 'shut down'
end

local function fields_of(kv)
  local f = {}
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  return f
end

local function notify(f, status, payload_field, payload)
  local cmd = f['id']
  if not cmd then return end
  local rkey = ARGV[3] .. ':{r' .. cmd .. '}'
  redis.call('HSET', rkey, 'status', status, payload_field, payload, 'engine', id, 'op', f['op'] or '')
  redis.call('PEXPIRE', rkey, ARGV[4])
  if f['client'] then
    local rep = ARGV[3] .. ':{c' .. f['client'] .. '}:replies'
    redis.call('XADD', rep, '*', 'id', cmd, 'status', status, payload_field, payload, 'engine', id)
    redis.call('PEXPIRE', rep, ARGV[4])
  end
end

local function fail(f, was, poison)
  if not f['id'] then return 0 end
  local msg = 'engine ' .. id .. ' ' .. why .. (was and ' while running ' or ' before starting ')
    .. (f['op'] or 'a') .. ' command ' .. f['id']
  local kind = errtype
  if poison then
    kind = 'PoisonCommandError'
    msg = msg .. ': the ' .. poison .. ' engines it was delivered to all died; it is not '
      .. 'delivered again (its entry is in the dead-letter stream ' .. KEYS[9] .. ')'
  elseif f['actor'] then  -- the actor lived there: ActorDiedError (an EngineDiedError too)
    kind = 'ActorDiedError'
    msg = msg .. ' (actor ' .. f['actor'] .. ' is gone with it)'
  end
  notify(f, 'error', 'error', cjson.encode({kind = 'system', type = kind, message = msg,
    attrs = {engine_id = tonumber(id), started = was, cmd_id = f['id']}}))
  return 1
end

local failed = 0
-- this engine's inbox
local started = {}
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[3], 'engine', '-', '+', 1000000)
if ok then
  for _, p in ipairs(pending) do started[p[1]] = true end
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[3], '-', '+')) do
  failed = failed + fail(fields_of(entry[2]), started[entry[1]] == true)
end
-- load-balanced tasks this engine had taken
local ok2, held = pcall(redis.call, 'XPENDING', KEYS[6], 'engine', '-', '+', 1000000, 'e' .. id)
if ok2 then
  for _, p in ipairs(held) do
    local found = redis.call('XRANGE', KEYS[6], p[1], p[1])
    if #found == 1 then
      local kv = found[1][2]
      local f = fields_of(kv)
      local left = tonumber(f['retries'] or '0') or 0
      local died = (tonumber(f['died'] or '0') or 0) + 1
      local again = {'died', tostring(died)}
      for i = 1, #kv, 2 do
        if kv[i] ~= 'died' then
          again[#again + 1] = kv[i]
          again[#again + 1] = (kv[i] == 'retries') and tostring(math.max(left - 1, 0)) or kv[i + 1]
        end
      end
      if left > 0 then
        redis.call('XADD', KEYS[6], '*', unpack(again))
      elseif died > 1 then
        redis.call('XADD', KEYS[9], 'MAXLEN', '~', 1000, '*', 'engine', id, unpack(again))
        failed = failed + fail(f, true, died)
      else
        failed = failed + fail(f, true)
      end
    end
    redis.call('XACK', KEYS[6], 'engine', p[1])
    redis.call('XDEL', KEYS[6], p[1])
  end
end
-- kill commands waiting in ctl succeed: the engine is gone either way
for _, entry in ipairs(redis.call('XRANGE', KEYS[5], '-', '+')) do
  local f = fields_of(entry[2])
  if f['op'] == 'kill' then notify(f, 'ok', 'op', 'kill') end
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
redis.call('PEXPIRE', KEYS[10], ARGV[4])
for i = 11, #KEYS do redis.call('DEL', KEYS[i]) end
-- The decision: from now on the engine's own writes (complete, heartbeat) are refused.
redis.call('SET', KEYS[7], mode, 'PX', ARGV[4])
pcall(redis.call, 'XGROUP', 'DELCONSUMER', KEYS[6], 'engine', 'e' .. id)
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

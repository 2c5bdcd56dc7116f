-- clear_queue: drop an engine's queued, not yet started commands; fail each as cancelled.
-- KEYS[1] P:{e<id>}:inbox
-- ARGV[1] engine id   ARGV[2] prefix P   ARGV[3] result TTL (ms)
-- The running command (delivered, in the PEL) is left alone. Atomic with respect to the
-- engine's reads: every entry is either delivered or dropped, never both.
-- Returns: {number of commands dropped, ids of the paged objects they carried...}: each
-- dropped command held one reference to its object, which the caller releases.
local started = {}
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], 'engine', '-', '+', 1000000)
if ok then
  for _, p in ipairs(pending) do started[p[1]] = true end
end
local dropped = 0
local objects = {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  if not started[entry[1]] then
    local f = {}
    local kv = entry[2]
    for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
    redis.call('XDEL', KEYS[1], entry[1])
    if f['obj'] then objects[#objects + 1] = f['obj'] end
    local cmd = f['id']
    if cmd then
      local err = cjson.encode({kind = 'system', type = 'CancelledError',
        message = (f['op'] or 'command') .. ' ' .. cmd .. ' was dropped from engine '
          .. ARGV[1] .. "'s queue by clear_queue", attrs = {engine_id = tonumber(ARGV[1])}})
      local rkey = ARGV[2] .. ':{r' .. cmd .. '}'
      redis.call('HSET', rkey, 'status', 'error', 'error', err, 'engine', ARGV[1], 'op', f['op'] or '')
      redis.call('PEXPIRE', rkey, ARGV[3])
      if f['client'] then
        local rep = ARGV[2] .. ':{c' .. f['client'] .. '}:replies'
        redis.call('XADD', rep, '*', 'id', cmd, 'status', 'error', 'error', err, 'engine', ARGV[1])
        redis.call('PEXPIRE', rep, ARGV[3])
      end
    end
    dropped = dropped + 1
  end
end
return {dropped, unpack(objects)}

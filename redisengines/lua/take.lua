-- take: without blocking, what an engine's blocking read would return — the next
-- load-balanced task and the next command of its own inbox, one of each at most — plus the
-- status of that task's result, so that the engine needs no second round trip to refuse a
-- task already run elsewhere (a replay).
-- KEYS[1] P:tasks   KEYS[2] P:{e<id>}:inbox
-- ARGV[1] consumer (e<id>)   ARGV[2] prefix P (result keys are named after the entries' ids)
-- Returns {task, command, status}: an entry is {id, {field, value, ...}} or false; status is
-- the task's result status or false. Errors (NOGROUP) are those of XREADGROUP.
local function one(key)
  local got = redis.call('XREADGROUP', 'GROUP', 'engine', ARGV[1], 'COUNT', 1,
                         'STREAMS', key, '>')
  if not got then return false end
  return got[1][2][1]
end
local task = one(KEYS[1])
local command = one(KEYS[2])
local status = false
if task then
  local kv = task[2]
  for i = 1, #kv, 2 do
    if kv[i] == 'id' then
      status = redis.call('HGET', ARGV[2] .. ':{r' .. kv[i + 1] .. '}', 'status')
      break
    end
  end
end
return {task, command, status}

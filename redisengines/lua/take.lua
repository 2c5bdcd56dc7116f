-- take: without blocking, what an engine's blocking read would return — the next
-- load-balanced tasks and the next commands of its own inbox — plus the status of each
-- task's result, so that the engine needs no second round trip to refuse a task already
-- run elsewhere (a replay).
-- KEYS[1] P:tasks   KEYS[2] P:{e<id>}:inbox
-- ARGV[1] consumer (e<id>)   ARGV[2] prefix P (result keys are named after the entries' ids)
-- ARGV[3] how many tasks at most   ARGV[4] how many inbox commands at most (0: none)
-- Returns {tasks, commands, statuses}: tasks and commands are lists of entries
-- {id, {field, value, ...}}; statuses[i] is the status of tasks[i]'s result, or false.
-- Errors (NOGROUP) are those of XREADGROUP.
local function some(key, n)
  if n <= 0 then return {} end
  local got = redis.call('XREADGROUP', 'GROUP', 'engine', ARGV[1], 'COUNT', n,
                         'STREAMS', key, '>')
  if not got then return {} end
  return got[1][2]
end
local tasks = some(KEYS[1], tonumber(ARGV[3]))
local commands = some(KEYS[2], tonumber(ARGV[4]))
local statuses = {}
for t, task in ipairs(tasks) do
  local kv = task[2]
  statuses[t] = false
  for i = 1, #kv, 2 do
    if kv[i] == 'id' then
      statuses[t] = redis.call('HGET', ARGV[2] .. ':{r' .. kv[i + 1] .. '}', 'status')
      break
    end
  end
end
return {tasks, commands, statuses}

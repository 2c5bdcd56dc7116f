-- give_back: return the tasks an engine took but has not started to the end of P:tasks,
-- where an idle engine takes them (the engine is busy with a slow command). Nothing is used
-- up: a task keeps its fields (retries, died), its signature (same stream) and its result
-- hash, whose `entry` names the new entry (so that cancel finds it).
-- KEYS[1] P:tasks   ARGV[1] consumer (e<id>)   ARGV[2] prefix P
-- ARGV[3..] the entries to keep: the one running, and those that ran and are not acked yet
-- Returns the ids of the entries given back.
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local back = {}
local held = redis.call('XPENDING', KEYS[1], 'engine', '-', '+', 1000, ARGV[1])
for _, p in ipairs(held) do
  local eid = p[1]
  if not keep[eid] then
    local entry = redis.call('XRANGE', KEYS[1], eid, eid)
    redis.call('XACK', KEYS[1], 'engine', eid)
    redis.call('XDEL', KEYS[1], eid)
    if #entry > 0 then
      local kv = entry[1][2]
      local id = redis.call('XADD', KEYS[1], '*', unpack(kv))
      for j = 1, #kv, 2 do
        if kv[j] == 'id' then
          local rkey = ARGV[2] .. ':{r' .. kv[j + 1] .. '}'
          if redis.call('HGET', rkey, 'status') == 'queued' then
            redis.call('HSET', rkey, 'entry', id)
          end
          break
        end
      end
    end
    back[#back + 1] = eid
  end
end
return back

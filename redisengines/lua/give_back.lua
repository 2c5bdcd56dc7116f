-- give_back: return tasks an engine took but has not started to the end of P:tasks, where an
-- idle engine takes them (the engine is busy with a slow command). Nothing is used up: a task
-- keeps its fields (retries, died), its signature (same stream) and its result hash, whose
-- `entry` names the new entry (so that cancel finds it).
-- KEYS[1] P:tasks   ARGV[1] consumer (e<id>)   ARGV[2] prefix P   ARGV[3..] entry ids
-- Returns the number of tasks given back; an entry no longer held by ARGV[1] is left alone.
local n = 0
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], 'engine', ARGV[i], ARGV[i], 1)
  if #held > 0 and held[1][2] == ARGV[1] then
    local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    redis.call('XACK', KEYS[1], 'engine', ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
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
      n = n + 1
    end
  end
end
return n

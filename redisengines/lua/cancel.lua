-- cancel: drop one command that no engine has started, and fail it with the given error.
-- KEYS[1] the stream holding it (P:{e<id>}:inbox or P:tasks)   KEYS[2] P:{r<cmd>}
-- KEYS[3] P:{c<client>}:replies
-- ARGV[1] stream entry id   ARGV[2] command id   ARGV[3] result TTL (ms)
-- ARGV[4] error record (JSON)
-- Atomic with respect to engines' reads: the entry is either delivered or dropped. The
-- result hash's `entry` wins over ARGV[1]: an engine that gave a task back re-queued it.
-- Returns: 1 dropped; 0 already started (delivered to an engine); -1 no longer queued.
local eid = redis.call('HGET', KEYS[2], 'entry') or ARGV[1]
local pending = redis.call('XPENDING', KEYS[1], 'engine', eid, eid, 1)
if #pending > 0 then
  return 0
end
if #redis.call('XRANGE', KEYS[1], eid, eid) == 0 then
  return -1
end
redis.call('XDEL', KEYS[1], eid)
redis.call('HSET', KEYS[2], 'status', 'error', 'error', ARGV[4], 'op', 'cancelled')
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], '*', 'id', ARGV[2], 'status', 'error', 'error', ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1

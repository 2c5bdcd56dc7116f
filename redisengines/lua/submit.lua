-- submit: queue one command, once, in a bounded stream, and open its result as "queued".
-- KEYS[1] the stream (P:{e<id>}:inbox or P:tasks)   KEYS[2] P:{r<cmd>}
-- ARGV[1] maximum stream length, 0 for none   ARGV[2] result TTL (ms)
-- ARGV[3..] the entry's field/value pairs
-- A retried call (its first reply lost) finds the result hash and queues nothing twice.
-- Returns: the entry id; the existing entry id (or '') for a repeat; -1 when the stream is full.
local known = redis.call('HGET', KEYS[2], 'entry')
if known then
  return known
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return ''
end
local max = tonumber(ARGV[1])
if max > 0 and redis.call('XLEN', KEYS[1]) >= max then
  return -1
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[2], 'status', 'queued', 'entry', id, 'stream', KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return id

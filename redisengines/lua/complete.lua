-- complete: store a command's result, notify its client, record it, and ack it; all or nothing.
-- KEYS[1] the entry's stream (P:{e<id>}:inbox or P:tasks)   KEYS[2] P:{e<id>}:fenced
-- KEYS[3] P:{e<id>}:done
-- KEYS[4] P:{r<cmd>} (for a refused entry: P:{rinvalid-<engine>-<entry>}, never the id it
--         claims)
-- KEYS[5] P:{c<client>}:replies
-- ARGV[1] stream entry id   ARGV[2] command id   ARGV[3] sequence number n (done entry n-0)
-- ARGV[4] result TTL (ms)   ARGV[5] done history length   ARGV[6] notify: 0 none, 1 full, 2 id only
-- ARGV[7] op   ARGV[8] status   ARGV[9..] result hash field/value pairs
-- Returns: 1; 2 when the entry was already completed (a retried call writes nothing twice);
-- -1 when the engine was retired (fenced: nothing is written).
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return 2
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
local ttl = ARGV[4]
if #fields > 0 then
  redis.call('HSET', KEYS[4], unpack(fields))
  redis.call('PEXPIRE', KEYS[4], ttl)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], ARGV[3] .. '-0',
  'id', ARGV[2], 'op', ARGV[7], 'status', ARGV[8], 'key', KEYS[4])
if ARGV[6] == '1' then
  redis.call('XADD', KEYS[5], '*', 'id', ARGV[2], unpack(fields))
  redis.call('PEXPIRE', KEYS[5], ttl)
elseif ARGV[6] == '2' then
  redis.call('XADD', KEYS[5], '*', 'id', ARGV[2], 'status', ARGV[8], 'fetch', '1')
  redis.call('PEXPIRE', KEYS[5], ttl)
end
redis.call('XACK', KEYS[1], 'engine', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1

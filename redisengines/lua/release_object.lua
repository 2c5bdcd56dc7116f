-- release_object: drop one reference to a paged object; the last reference deletes it.
-- KEYS[1] P:{o<oid>} (manifest)   KEYS[2..] its pages
-- A manifest without a "refs" field is not reference counted and is left to its TTL.
-- Returns: the references left (0 when deleted), or -1 when not reference counted.
if redis.call('HEXISTS', KEYS[1], 'refs') == 0 then
  return -1
end
local left = redis.call('HINCRBY', KEYS[1], 'refs', -1)
if left <= 0 then
  redis.call('DEL', unpack(KEYS))
  return 0
end
return left

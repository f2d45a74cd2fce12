-- Record memory that is already in use (a model cache) under one lease id, replacing
-- what that id held before. No capacity check: the bytes exist whether or not they fit;
-- admission then sees them as taken. GPU cache bytes ("gc<i>") count against a device's
-- memory but never against holding it: the cache belongs to the worker that serves it.
-- ARGV: 2 lease_id, 3 ttl_ms, 4 memory, 5 gpu JSON [id, bytes, ...], 6 holder
local id, ttl, mem = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local gpus = cjson.decode(ARGV[5])
local cap = capacity()
if cap == nil then return 0 end
free_lease(id)
if mem > 0 or #gpus > 0 then
  if mem > 0 then redis.call('HINCRBY', KEYS[2], 'memory', mem) end
  for i = 1, #gpus, 2 do redis.call('HINCRBY', KEYS[2], 'gc' .. gpus[i], gpus[i + 1]) end
  local lease = {m = mem, c = {}, g = gpus, x = 0, h = ARGV[6], t = '', k = 'cache'}
  redis.call('HSET', KEYS[4], id, cjson.encode(lease))
  redis.call('ZADD', KEYS[3], now_ms() + ttl, id)
end
refresh_index(cap)
return 1

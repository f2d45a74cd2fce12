-- Record memory that is already in use (a model cache) under one lease id, replacing
-- what that id held before. No capacity check: the bytes exist whether or not they fit;
-- admission then sees them as taken. GPU cache bytes ("gc<i>") count against a device's
-- memory but never against holding it: the cache belongs to the worker that serves it.
-- KEYS: 1-9 the prelude's
-- ARGV: 1 node, 2 lease_id, 3 ttl_ms, 4 memory, 5 gpu JSON [id, bytes, ...], 6 holder
local LEASE_ID = ARGV[2]
local TTL_MS = tonumber(ARGV[3])
local MEMORY = tonumber(ARGV[4])
local GPUS = cjson.decode(ARGV[5])
local HOLDER = ARGV[6]

local cap = capacity()
if cap == nil then return 0 end
free_lease(LEASE_ID)
if MEMORY > 0 or #GPUS > 0 then
  if MEMORY > 0 then
    redis.call('HINCRBY', USED, 'memory', MEMORY)
    redis.call('HINCRBY', USED, 'mc', MEMORY)  -- a host cache's bytes, apart: the CPU's KV budget leaves them out
  end
  for i = 1, #GPUS, 2 do redis.call('HINCRBY', USED, 'gc' .. GPUS[i], GPUS[i + 1]) end
  local lease = {m = MEMORY, c = {}, g = GPUS, x = 0, h = HOLDER, t = '', k = 'cache'}
  redis.call('HSET', LEASE_DATA, LEASE_ID, cjson.encode(lease))
  redis.call('ZADD', LEASES, now_ms() + TTL_MS, LEASE_ID)
end
refresh_index(cap)
return 1

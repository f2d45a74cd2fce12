-- Shared by every ledger script (ledger.py puts it in front of each).
-- KEYS (keys.KeySchema.ledger, in this order; a script's own keys follow from 10):
--   1 capacity, 2 used, 3 leases, 4 lease_data,
--   5 free_memory, 6 free_core_milli, 7 free_whole_cores, 8 free_gpus, 9 free_gpu_memory
-- ARGV: 1 node id (a script's own arguments follow from 2)
local CAPACITY = KEYS[1]
local USED = KEYS[2]
local LEASES = KEYS[3]
local LEASE_DATA = KEYS[4]
local FREE_MEMORY = KEYS[5]
local FREE_CORE_MILLI = KEYS[6]
local FREE_WHOLE_CORES = KEYS[7]
local FREE_GPUS = KEYS[8]
local FREE_GPU_MEMORY = KEYS[9]
local NODE = ARGV[1]

-- ``list`` from position ``first`` on, as a new list (a script's variable-length KEYS or ARGV).
local function tail(list, first)
  local out = {}
  for i = first, #list do out[#out + 1] = list[i] end
  return out
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hash(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

local function num(t, field)
  return tonumber(t[field] or '0') or 0
end

-- The capacity is one JSON field, so reading it is one HGET and one decode.
local function capacity()
  local raw = redis.call('HGET', CAPACITY, 'spec')
  if not raw then return nil end
  local spec = cjson.decode(raw)
  local cap = {memory = spec.memory, cores = spec.cores, gpus = {}, gpu_mem = {}, sharing = spec.sharing == 1,
               kv = tonumber(spec.kv or 0) or 0}
  for _, pair in ipairs(spec.gpus) do
    table.insert(cap.gpus, pair[1])
    cap.gpu_mem[pair[1]] = pair[2]
  end
  return cap
end

local function free_lease(id)
  local raw = redis.call('HGET', LEASE_DATA, id)
  redis.call('ZREM', LEASES, id)
  if not raw then return false end
  redis.call('HDEL', LEASE_DATA, id)
  local l = cjson.decode(raw)
  if l.m > 0 then redis.call('HINCRBY', USED, 'memory', -l.m) end
  if l.k == 'cache' and l.m > 0 then redis.call('HINCRBY', USED, 'mc', -l.m) end
  if (l.kv or 0) > 0 then
    for _, d in ipairs(l.kd or {}) do redis.call('HINCRBY', USED, 'kv' .. d, -l.kv) end
  end
  for i = 1, #l.c, 2 do redis.call('HINCRBY', USED, 'c' .. l.c[i], -l.c[i + 1]) end
  if (l.s or 0) > 0 then redis.call('HINCRBY', USED, 'shared', -l.s) end
  for i = 1, #l.g, 2 do
    if l.k == 'cache' then
      redis.call('HINCRBY', USED, 'gc' .. l.g[i], -l.g[i + 1])
    else
      redis.call('HINCRBY', USED, 'g' .. l.g[i], -l.g[i + 1])
      redis.call('HINCRBY', USED, 'gh' .. l.g[i], -1)
    end
    if l.x == 1 then redis.call('HINCRBY', USED, 'gx' .. l.g[i], -1) end
  end
  return true
end

local function expire_stale(now)
  local dead = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now)
  for _, id in ipairs(dead) do free_lease(id) end
  return #dead
end

-- CPU as Kubernetes' static CPU manager has it: a whole-core request holds its cores alone
-- ("c<id>" = 1000); fractional requests share the pool of every core nobody holds alone, and
-- "shared" counts their thousandths. Returns the pool's core ids and its free thousandths.
local function shared_pool(cap, used)
  local pool = {}
  for _, c in ipairs(cap.cores) do
    if num(used, 'c' .. c) == 0 then table.insert(pool, c) end
  end
  return pool, #pool * 1000 - num(used, 'shared')
end

-- A device's KV budget ("cpu" or a GPU index, as a string): the configured bytes, else ("auto") the
-- device's memory less what the model caches hold on it ("mc": host, "gc<i>": GPU) and a tenth of it
-- as headroom (activations, the allocator). ``empty``: as if no cache held anything (could it ever fit).
local function kv_budget(cap, used, dev, empty)
  if cap.kv > 0 then return cap.kv end
  local total, cached
  if dev == 'cpu' then
    total, cached = cap.memory, num(used, 'mc')
  else
    total, cached = cap.gpu_mem[tonumber(dev)] or 0, num(used, 'gc' .. dev)
  end
  if empty then cached = 0 end
  return total - cached - math.floor(total / 10)
end

-- Keep the placement indexes equal to what is free right now (``used``: the used hash, if at hand).
local function refresh_index(cap, used)
  if cap == nil then return end
  used = used or hash(USED)
  redis.call('ZADD', FREE_MEMORY, cap.memory - num(used, 'memory'), NODE)
  -- a fraction fits the pool's free thousandths; a whole core may leave the pool while
  -- the cores that stay still cover every fraction running in it
  local pool, free_shared = shared_pool(cap, used)
  redis.call('ZADD', FREE_CORE_MILLI, math.max(0, free_shared), NODE)
  redis.call('ZADD', FREE_WHOLE_CORES, math.max(0, math.floor(free_shared / 1000)), NODE)
  local free_gpus, best_gpu = 0, 0
  for _, g in ipairs(cap.gpus) do
    local holders = num(used, 'gh' .. g)
    if holders == 0 then free_gpus = free_gpus + 1 end
    -- serving requests share a device on every node; only a device held alone is closed to them
    local usable = (holders == 0) or num(used, 'gx' .. g) == 0
    if usable then
      local free = cap.gpu_mem[g] - num(used, 'g' .. g) - num(used, 'gc' .. g)
      if free > best_gpu then best_gpu = free end
    end
  end
  redis.call('ZADD', FREE_GPUS, free_gpus, NODE)
  redis.call('ZADD', FREE_GPU_MEMORY, best_gpu, NODE)
end

-- Shared by every ledger script (prepended by ledger.py).
-- KEYS: 1 capacity, 2 used, 3 leases, 4 lease_data, 5.. task guard keys
-- ARGV[1] is always the node id. The global placement indexes are named from
-- the key prefix (all hypha keys live on one Redis; see hypha_celery/keys.py):
-- fewer keys to send makes each call cheaper for the client.
local NODE = ARGV[1]
local PREFIX = string.match(KEYS[1], '^(.-):node:')
local FREE_MEMORY = PREFIX .. ':index:free_memory'
local FREE_CORE_MILLI = PREFIX .. ':index:free_core_milli'
local FREE_WHOLE_CORES = PREFIX .. ':index:free_whole_cores'
local FREE_GPUS = PREFIX .. ':index:free_gpus'
local FREE_GPU_MEMORY = PREFIX .. ':index:free_gpu_memory'
local CAP_MEMORY = PREFIX .. ':index:cap_memory'
local CAP_CORES = PREFIX .. ':index:cap_cores'
local CAP_GPUS = PREFIX .. ':index:cap_gpus'
local CAP_GPU_MEMORY = PREFIX .. ':index:cap_gpu_memory'

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
  local raw = redis.call('HGET', KEYS[1], 'spec')
  if not raw then return nil end
  local spec = cjson.decode(raw)
  local cap = {memory = spec.memory, cores = spec.cores, gpus = {}, gpu_mem = {}, sharing = spec.sharing == 1}
  for _, pair in ipairs(spec.gpus) do
    table.insert(cap.gpus, pair[1])
    cap.gpu_mem[pair[1]] = pair[2]
  end
  return cap
end

local function free_lease(id)
  local raw = redis.call('HGET', KEYS[4], id)
  redis.call('ZREM', KEYS[3], id)
  if not raw then return false end
  redis.call('HDEL', KEYS[4], id)
  local l = cjson.decode(raw)
  if l.m > 0 then redis.call('HINCRBY', KEYS[2], 'memory', -l.m) end
  for i = 1, #l.c, 2 do redis.call('HINCRBY', KEYS[2], 'c' .. l.c[i], -l.c[i + 1]) end
  for i = 1, #l.g, 2 do
    if l.k == 'cache' then
      redis.call('HINCRBY', KEYS[2], 'gc' .. l.g[i], -l.g[i + 1])
    else
      redis.call('HINCRBY', KEYS[2], 'g' .. l.g[i], -l.g[i + 1])
      redis.call('HINCRBY', KEYS[2], 'gh' .. l.g[i], -1)
    end
    if l.x == 1 then redis.call('HINCRBY', KEYS[2], 'gx' .. l.g[i], -1) end
  end
  return true
end

local function expire_stale(now)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  for _, id in ipairs(dead) do free_lease(id) end
  return #dead
end

-- Keep the placement indexes equal to what is free right now (``used``: the used hash, if at hand).
local function refresh_index(cap, used)
  if cap == nil then return end
  used = used or hash(KEYS[2])
  redis.call('ZADD', FREE_MEMORY, cap.memory - num(used, 'memory'), NODE)
  local best_core, whole = 0, 0
  for _, c in ipairs(cap.cores) do
    local free = 1000 - num(used, 'c' .. c)
    if free > best_core then best_core = free end
    if free == 1000 then whole = whole + 1 end
  end
  redis.call('ZADD', FREE_CORE_MILLI, best_core, NODE)
  redis.call('ZADD', FREE_WHOLE_CORES, whole, NODE)
  local free_gpus, best_gpu = 0, 0
  for _, g in ipairs(cap.gpus) do
    local holders = num(used, 'gh' .. g)
    if holders == 0 then free_gpus = free_gpus + 1 end
    local usable = (holders == 0) or (cap.sharing and num(used, 'gx' .. g) == 0)
    if usable then
      local free = cap.gpu_mem[g] - num(used, 'g' .. g) - num(used, 'gc' .. g)
      if free > best_gpu then best_gpu = free end
    end
  end
  redis.call('ZADD', FREE_GPUS, free_gpus, NODE)
  redis.call('ZADD', FREE_GPU_MEMORY, best_gpu, NODE)
end

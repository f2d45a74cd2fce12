-- Shared by every ledger script (prepended by ledger.py).
-- KEYS: 1 capacity, 2 used, 3 leases, 4 lease_data,
--       5 free_memory, 6 free_core_milli, 7 free_whole_cores, 8 free_gpus, 9 free_gpu_memory,
--       10 cap_memory, 11 cap_cores, 12 cap_gpus, 13 cap_gpu_memory, 14.. task guard keys
-- ARGV[1] is always the node id.
local NODE = ARGV[1]

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

local function capacity()
  local raw = hash(KEYS[1])
  if raw['memory'] == nil then return nil end
  local cap = {
    memory = tonumber(raw['memory']),
    cores = cjson.decode(raw['core_ids']),
    gpus = cjson.decode(raw['gpu_ids']),
    gpu_mem = {},
    sharing = raw['gpu_sharing'] == '1',
  }
  for _, g in ipairs(cap.gpus) do cap.gpu_mem[g] = tonumber(raw['gpu_mem:' .. g]) end
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
    redis.call('HINCRBY', KEYS[2], 'g' .. l.g[i], -l.g[i + 1])
    if l.k == 'task' then redis.call('HINCRBY', KEYS[2], 'gh' .. l.g[i], -1) end
    if l.x == 1 then redis.call('HINCRBY', KEYS[2], 'gx' .. l.g[i], -1) end
  end
  return true
end

local function expire_stale(now)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  for _, id in ipairs(dead) do free_lease(id) end
  return #dead
end

-- Keep the placement indexes equal to what is free right now.
local function refresh_index(cap)
  if cap == nil then return end
  local used = hash(KEYS[2])
  redis.call('ZADD', KEYS[5], cap.memory - num(used, 'memory'), NODE)
  local best_core, whole = 0, 0
  for _, c in ipairs(cap.cores) do
    local free = 1000 - num(used, 'c' .. c)
    if free > best_core then best_core = free end
    if free == 1000 then whole = whole + 1 end
  end
  redis.call('ZADD', KEYS[6], best_core, NODE)
  redis.call('ZADD', KEYS[7], whole, NODE)
  local free_gpus, best_gpu = 0, 0
  for _, g in ipairs(cap.gpus) do
    local holders = num(used, 'gh' .. g)
    if holders == 0 then free_gpus = free_gpus + 1 end
    local usable = (holders == 0) or (cap.sharing and num(used, 'gx' .. g) == 0)
    if usable then
      local free = cap.gpu_mem[g] - num(used, 'g' .. g)
      if free > best_gpu then best_gpu = free end
    end
  end
  redis.call('ZADD', KEYS[8], free_gpus, NODE)
  redis.call('ZADD', KEYS[9], best_gpu, NODE)
end

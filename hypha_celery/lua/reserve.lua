-- All-or-nothing reservation of memory + CPU + GPU, as one lease.
-- KEYS: 1-9 the prelude's, 10 the task's guard (keys.KeySchema.task_guard; a placeholder without a task)
-- ARGV: 1 node, 2 lease_id, 3 ttl_ms, 4 memory, 5 cpu_milli, 6 gpus, 7 gpu_memory (0 = whole device),
--       8 holder, 9 task_id ('' for none), 10 kv (KV-cache bytes, part of memory or gpu_memory, also
--       counted against the device's KV budget: prelude's kv_budget), 11 GPU mode ('node': the node's
--       gpu_sharing decides, 'shared': by gpu_memory, 'exclusive': each GPU held alone)
-- Returns JSON: {ok=true, id, m, c=[core, 1000, ...] (cores held alone), s (thousandths of the shared
--            pool), a=[core, ...] (the pool, a fraction's affinity), g=[gpu, bytes, ...], x, e,
--            kv, kd=[device, ...] (the KV budgets it holds: 'cpu' or GPU indexes)}
--            or {ok=false, why='busy'|'infeasible'|'duplicate'|'unknown_node', resource=..., lease=..., holder=...}
local GUARD = KEYS[10]
local LEASE_ID = ARGV[2]
local TTL_MS = tonumber(ARGV[3])
local MEMORY = tonumber(ARGV[4])
local CPU_MILLI = tonumber(ARGV[5])
local NGPU = tonumber(ARGV[6])
local GPU_MEMORY = tonumber(ARGV[7])
local HOLDER = ARGV[8]
local TASK_ID = ARGV[9]
local KV = tonumber(ARGV[10] or '0') or 0
local GPU_MODE = ARGV[11] or 'node'

local cap = capacity()
if cap == nil then return cjson.encode({ok = false, why = 'unknown_node'}) end
local now = now_ms()
if expire_stale(now) > 0 then refresh_index(cap) end

-- The same call again (its reply was lost with a dropped connection, and it was sent once more):
-- answer with the lease it took, so a retried reservation never takes twice or meets itself as a duplicate.
local taken = redis.call('HGET', LEASE_DATA, LEASE_ID)
if taken then
  local l = cjson.decode(taken)
  return cjson.encode({ok = true, id = LEASE_ID, m = l.m, c = l.c, s = l.s, a = l.a, g = l.g, x = l.x,
                       e = tonumber(redis.call('ZSCORE', LEASES, LEASE_ID)), kv = l.kv or 0, kd = l.kd or {}})
end

-- The task guard lives as long as the lease that runs the task (on any node: renewals
-- extend both), then says "done" for a while, so a copy of the task never runs beside
-- it or right after it.
if TASK_ID ~= '' then
  local other = redis.call('GET', GUARD)
  if other then
    local raw = redis.call('HGET', LEASE_DATA, other)
    local h = raw and cjson.decode(raw).h or ''
    return cjson.encode({ok = false, why = 'duplicate', lease = other, holder = h})
  end
end

-- Infeasible: could not fit even on an empty node.
local function refuse(why, resource)
  return cjson.encode({ok = false, why = why, resource = resource})
end
if MEMORY > cap.memory then return refuse('infeasible', 'memory') end
if CPU_MILLI >= 1000 and CPU_MILLI / 1000 > #cap.cores then return refuse('infeasible', 'cpu') end
if #cap.cores == 0 and CPU_MILLI > 0 then return refuse('infeasible', 'cpu') end
local used = hash(USED)
if NGPU > 0 then
  local big_enough, kv_room = 0, 0
  for _, g in ipairs(cap.gpus) do
    if cap.gpu_mem[g] >= GPU_MEMORY then big_enough = big_enough + 1 end
    if cap.gpu_mem[g] >= GPU_MEMORY and kv_budget(cap, used, tostring(g), true) >= KV then kv_room = kv_room + 1 end
  end
  if big_enough < NGPU then return refuse('infeasible', 'gpu') end
  if kv_room < NGPU then return refuse('infeasible', 'kv') end
elseif KV > kv_budget(cap, used, 'cpu', true) then
  return refuse('infeasible', 'kv')
end

if num(used, 'memory') + MEMORY > cap.memory then return refuse('busy', 'memory') end

-- CPU (prelude's shared_pool): whole cores are held alone, taken from the shared pool only while
-- the cores left in it still cover the fractions running there; a fraction takes thousandths of
-- the pool and may run on every core of it (its affinity: the pool as it is now).
local cores, shared, affinity = {}, 0, {}
local pool, free_shared = shared_pool(cap, used)
if CPU_MILLI >= 1000 then
  local want = CPU_MILLI / 1000
  if free_shared < CPU_MILLI then return refuse('busy', 'cpu') end
  for i = 1, want do table.insert(cores, pool[i]); table.insert(cores, 1000) end
elseif CPU_MILLI > 0 then
  if free_shared < CPU_MILLI then return refuse('busy', 'cpu') end
  shared, affinity = CPU_MILLI, pool
end

-- KV: the request's KV cache within its device's budget (a generation on the CPU here; on a GPU below).
if NGPU == 0 and KV > 0 and num(used, 'kvcpu') + KV > kv_budget(cap, used, 'cpu') then return refuse('busy', 'kv') end

-- GPU: a whole device (no per-device amount) is always held alone; otherwise the request's mode says,
-- and 'node' leaves it to the node's gpu_sharing.
local exclusive = GPU_MEMORY == 0 or GPU_MODE == 'exclusive' or (GPU_MODE == 'node' and not cap.sharing)
local gpus, taken = {}, {}
for _ = 1, NGPU do
  local best, best_free, short_of_kv = nil, nil, false
  for _, g in ipairs(cap.gpus) do
    if not taken[g] then
      local cached = num(used, 'gc' .. g)
      local holders, free = num(used, 'gh' .. g), cap.gpu_mem[g] - num(used, 'g' .. g) - cached
      -- a whole device is the device less what this node's own model cache keeps on it
      local need = GPU_MEMORY > 0 and GPU_MEMORY or (cap.gpu_mem[g] - cached)
      local ok
      if exclusive then ok = holders == 0 else ok = num(used, 'gx' .. g) == 0 end
      ok = ok and free >= need
      if ok and KV > 0 and num(used, 'kv' .. g) + KV > kv_budget(cap, used, tostring(g)) then
        ok, short_of_kv = false, true
      end
      if ok and (best_free == nil or free < best_free) then best, best_free = g, free end
    end
  end
  if best == nil then return refuse('busy', short_of_kv and 'kv' or 'gpu') end
  taken[best] = true
  table.insert(gpus, best); table.insert(gpus, GPU_MEMORY > 0 and GPU_MEMORY or (cap.gpu_mem[best] - num(used, 'gc' .. best)))
end

-- Commit (and keep ``used`` current, so the index refresh need not read it again).
local x = (NGPU > 0 and exclusive) and 1 or 0
local function add(field, amount)
  used[field] = redis.call('HINCRBY', USED, field, amount)
end
if MEMORY > 0 then add('memory', MEMORY) end
for i = 1, #cores, 2 do add('c' .. cores[i], cores[i + 1]) end
if shared > 0 then add('shared', shared) end
local kd = {}
for i = 1, #gpus, 2 do
  add('g' .. gpus[i], gpus[i + 1])
  add('gh' .. gpus[i], 1)
  if x == 1 then add('gx' .. gpus[i], 1) end
  if KV > 0 then table.insert(kd, tostring(gpus[i])) end
end
if KV > 0 and NGPU == 0 then table.insert(kd, 'cpu') end
for _, d in ipairs(kd) do add('kv' .. d, KV) end
local expires = now + TTL_MS
local lease = {m = MEMORY, c = cores, s = shared, a = affinity, g = gpus, x = x, h = HOLDER, t = TASK_ID, k = 'task',
               kv = KV, kd = kd}
redis.call('HSET', LEASE_DATA, LEASE_ID, cjson.encode(lease))
redis.call('ZADD', LEASES, expires, LEASE_ID)
if TASK_ID ~= '' then redis.call('SET', GUARD, LEASE_ID, 'PX', TTL_MS) end
refresh_index(cap, used)
return cjson.encode({ok = true, id = LEASE_ID, m = MEMORY, c = cores, s = shared, a = affinity, g = gpus, x = x,
                     e = expires, kv = KV, kd = kd})

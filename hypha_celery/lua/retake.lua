-- Renew leases a live process holds, and take back those that were lost (reaped after a ledger
-- outage longer than the TTL, or a holder stalled past it). The process still uses them, so each
-- comes back as it was - same id, same cores and GPUs, same task guard - even where that
-- over-commits the node: the ledger then says what is really in use, and admission waits until
-- it drops. What a taken-back lease over-commits is returned, for the holder to log.
-- KEYS: 1-9 the prelude's, 10.. the task guard of each lease (same order as the leases; may be placeholders)
-- ARGV: 1 node, 2 ttl_ms, 3 JSON list of leases, each as reserve.lua / account.lua store them plus its id:
--       {id, m, c=[core, milli, ...], s, a=[core, ...], g=[gpu, bytes, ...], x, h, t, k='task'|'cache',
--        kv (KV-cache bytes), kd=[device, ...] (the KV budgets it counts against)}
-- Returns JSON {retaken = {id = [what it over-commits, ...], ...}} (leases still alive are only renewed).
local TTL_MS = tonumber(ARGV[2])
local HELD = cjson.decode(ARGV[3])
local GUARDS = tail(KEYS, 10)

local now = now_ms()
local reaped = expire_stale(now)
local cap = capacity()
local used = hash(USED)
local retaken = {}

local function add(field, amount)
  used[field] = redis.call('HINCRBY', USED, field, amount)
end

for i, l in ipairs(HELD) do
  local guard = GUARDS[i]
  if redis.call('ZSCORE', LEASES, l.id) then
    redis.call('ZADD', LEASES, now + TTL_MS, l.id)
    if guard and redis.call('GET', guard) == l.id then redis.call('PEXPIRE', guard, TTL_MS) end
  else
    local clash = {}
    if l.m > 0 then
      add('memory', l.m)
      if l.k == 'cache' then add('mc', l.m) end
      if cap and num(used, 'memory') > cap.memory then table.insert(clash, 'memory') end
    end
    for j = 1, #l.c, 2 do
      if num(used, 'c' .. l.c[j]) > 0 then table.insert(clash, 'core ' .. l.c[j]) end
      add('c' .. l.c[j], l.c[j + 1])
    end
    if (l.s or 0) > 0 then add('shared', l.s) end
    for j = 1, #l.g, 2 do
      local g, amount = l.g[j], l.g[j + 1]
      if l.k == 'cache' then
        add('gc' .. g, amount)
      else
        local busy = (l.x == 1 and num(used, 'gh' .. g) > 0) or num(used, 'gx' .. g) > 0
        if busy then table.insert(clash, 'gpu ' .. g) end
        add('g' .. g, amount)
        add('gh' .. g, 1)
        if l.x == 1 then add('gx' .. g, 1) end
      end
      if cap and cap.gpu_mem[g] and num(used, 'g' .. g) + num(used, 'gc' .. g) > cap.gpu_mem[g] then
        table.insert(clash, 'gpu memory ' .. g)
      end
    end
    for _, d in ipairs(l.kd or {}) do
      add('kv' .. d, l.kv)
      if cap and num(used, 'kv' .. d) > kv_budget(cap, used, d) then table.insert(clash, 'kv ' .. d) end
    end
    if cap and select(2, shared_pool(cap, used)) < 0 then table.insert(clash, 'cpu') end
    local data = {m = l.m, c = l.c, s = l.s or 0, a = l.a or {}, g = l.g, x = l.x, h = l.h, t = l.t, k = l.k,
                  kv = l.kv or 0, kd = l.kd or {}}
    redis.call('HSET', LEASE_DATA, l.id, cjson.encode(data))
    redis.call('ZADD', LEASES, now + TTL_MS, l.id)
    if l.t ~= '' and guard then
      local other = redis.call('GET', guard)
      if not other then
        redis.call('SET', guard, l.id, 'PX', TTL_MS)
      elseif other ~= l.id then
        table.insert(clash, 'task (a copy runs under ' .. other .. ')')
      end
    end
    retaken[l.id] = clash
  end
end
if cap and (reaped > 0 or next(retaken) ~= nil) then refresh_index(cap, used) end
return cjson.encode({retaken = retaken})

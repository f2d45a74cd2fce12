-- Reap expired leases, then report capacity, usage, live leases and each device's KV budget as JSON
-- (``kv``: device ('cpu' or a GPU index) -> its budget now, prelude's kv_budget).
-- KEYS: 1-9 the prelude's
-- ARGV: 1 node
local now = now_ms()
local reaped = expire_stale(now)
local cap = capacity()
if reaped > 0 then refresh_index(cap) end
local leases = {}
local ids = redis.call('ZRANGE', LEASES, 0, -1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local raw = redis.call('HGET', LEASE_DATA, ids[i])
  if raw then
    local l = cjson.decode(raw)
    l.id = ids[i]; l.e = tonumber(ids[i + 1])
    table.insert(leases, l)
  end
end
local used = hash(USED)
local kv = {}
if cap then
  kv['cpu'] = kv_budget(cap, used, 'cpu')
  for _, g in ipairs(cap.gpus) do kv[tostring(g)] = kv_budget(cap, used, tostring(g)) end
end
return cjson.encode({now = now, capacity = cap and hash(CAPACITY) or false, used = used, leases = leases, kv = kv})

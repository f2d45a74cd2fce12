-- Reap expired leases, then report capacity, usage and live leases as JSON.
local now = now_ms()
local reaped = expire_stale(now)
local cap = capacity()
if reaped > 0 then refresh_index(cap) end
local leases = {}
local ids = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local raw = redis.call('HGET', KEYS[4], ids[i])
  if raw then
    local l = cjson.decode(raw)
    l.id = ids[i]; l.e = tonumber(ids[i + 1])
    table.insert(leases, l)
  end
end
return cjson.encode({now = now, capacity = cap and hash(KEYS[1]) or false, used = hash(KEYS[2]), leases = leases})

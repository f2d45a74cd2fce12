-- Extend leases (and their task guards) by a TTL.
-- KEYS: 1-9 the prelude's, 10.. the task guard of each lease (same order as the ids)
-- ARGV: 1 node, 2 ttl_ms, 3.. lease ids
-- Returns the ids that were already gone (expired or released): their holders lost them.
local TTL_MS = tonumber(ARGV[2])
local GUARDS = tail(KEYS, 10)
local LEASE_IDS = tail(ARGV, 3)

local now = now_ms()
local lost = {}
local reaped = expire_stale(now)
for i, id in ipairs(LEASE_IDS) do
  if redis.call('ZSCORE', LEASES, id) then
    redis.call('ZADD', LEASES, now + TTL_MS, id)
    local guard = GUARDS[i]
    if guard and redis.call('GET', guard) == id then redis.call('PEXPIRE', guard, TTL_MS) end
  else
    table.insert(lost, id)
  end
end
if reaped > 0 then refresh_index(capacity()) end
return lost

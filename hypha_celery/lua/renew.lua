-- ARGV: 2 ttl_ms, 3.. lease ids; KEYS[5..] their task guard keys (same order).
-- Returns the ids that were already gone (expired or released): their holders lost them.
local ttl = tonumber(ARGV[2])
local now = now_ms()
local lost = {}
local reaped = expire_stale(now)
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZADD', KEYS[3], now + ttl, id)
    local guard = KEYS[2 + i]
    if guard and redis.call('GET', guard) == id then redis.call('PEXPIRE', guard, ttl) end
  else
    table.insert(lost, id)
  end
end
if reaped > 0 then refresh_index(capacity()) end
return lost

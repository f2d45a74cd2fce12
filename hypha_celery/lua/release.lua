-- Give leases back; a task's guard then says "done" for 60 s.
-- KEYS: 1-9 the prelude's, 10.. the task guard of each lease (same order as the ids; may be placeholders)
-- ARGV: 1 node, 2.. lease ids
-- Returns how many of the leases were still held.
local GUARDS = tail(KEYS, 10)
local LEASE_IDS = tail(ARGV, 2)

local freed = 0
for i, id in ipairs(LEASE_IDS) do
  if free_lease(id) then freed = freed + 1 end
  local guard = GUARDS[i]
  if guard and redis.call('GET', guard) == id then redis.call('SET', guard, 'done', 'PX', 60000) end
end
refresh_index(capacity())
return freed

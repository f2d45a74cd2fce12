-- ARGV: 2.. lease ids; KEYS[5..] their task guard keys (same order; may be placeholders).
local freed = 0
for i = 2, #ARGV do
  if free_lease(ARGV[i]) then freed = freed + 1 end
  local guard = KEYS[3 + i]
  if guard and redis.call('GET', guard) == ARGV[i] then redis.call('SET', guard, 'done', 'PX', 60000) end
end
refresh_index(capacity())
return freed

-- ARGV: 2 memory, 3 core_ids JSON, 4 gpu JSON {"<id>": bytes}, 5 gpu_sharing (0/1)
local gpus = cjson.decode(ARGV[4])
local ids, biggest = {}, 0
for id, bytes in pairs(gpus) do
  table.insert(ids, tonumber(id))
  if bytes > biggest then biggest = bytes end
end
table.sort(ids)
local old = redis.call('HGETALL', KEYS[1])
for i = 1, #old, 2 do
  if string.sub(old[i], 1, 8) == 'gpu_mem:' then redis.call('HDEL', KEYS[1], old[i]) end
end
redis.call('HSET', KEYS[1], 'memory', ARGV[2], 'core_ids', ARGV[3],
           'gpu_ids', #ids > 0 and cjson.encode(ids) or '[]', 'gpu_sharing', ARGV[5])
for _, id in ipairs(ids) do redis.call('HSET', KEYS[1], 'gpu_mem:' .. id, gpus[tostring(id)]) end
local cores = cjson.decode(ARGV[3])
redis.call('ZADD', KEYS[10], ARGV[2], NODE)
redis.call('ZADD', KEYS[11], #cores, NODE)
redis.call('ZADD', KEYS[12], #ids, NODE)
redis.call('ZADD', KEYS[13], biggest, NODE)
local cap = capacity()
expire_stale(now_ms())
refresh_index(cap)
return 1

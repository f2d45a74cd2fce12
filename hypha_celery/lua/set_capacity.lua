-- ARGV: 2 capacity JSON {"memory": bytes, "cores": [ids], "gpus": [[id, bytes], ...], "sharing": 0|1}
local spec = cjson.decode(ARGV[2])
local biggest = 0
for _, pair in ipairs(spec.gpus) do
  if pair[2] > biggest then biggest = pair[2] end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'spec', ARGV[2])
redis.call('ZADD', CAP_MEMORY, spec.memory, NODE)
redis.call('ZADD', CAP_CORES, #spec.cores, NODE)
redis.call('ZADD', CAP_GPUS, #spec.gpus, NODE)
redis.call('ZADD', CAP_GPU_MEMORY, biggest, NODE)
local cap = capacity()
expire_stale(now_ms())
refresh_index(cap)
return 1

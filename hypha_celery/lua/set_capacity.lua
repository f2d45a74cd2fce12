-- Publish what a node offers; its leases are kept.
-- KEYS: 1-9 the prelude's, 10 cap_memory, 11 cap_cores, 12 cap_gpus, 13 cap_gpu_memory
-- ARGV: 1 node, 2 capacity JSON {"memory": bytes, "cores": [ids], "gpus": [[id, bytes], ...], "sharing": 0|1}
local CAP_MEMORY = KEYS[10]
local CAP_CORES = KEYS[11]
local CAP_GPUS = KEYS[12]
local CAP_GPU_MEMORY = KEYS[13]
local SPEC = ARGV[2]

local spec = cjson.decode(SPEC)
local biggest = 0
for _, pair in ipairs(spec.gpus) do
  if pair[2] > biggest then biggest = pair[2] end
end
redis.call('DEL', CAPACITY)
redis.call('HSET', CAPACITY, 'spec', SPEC)
redis.call('ZADD', CAP_MEMORY, spec.memory, NODE)
redis.call('ZADD', CAP_CORES, #spec.cores, NODE)
redis.call('ZADD', CAP_GPUS, #spec.gpus, NODE)
redis.call('ZADD', CAP_GPU_MEMORY, biggest, NODE)
local cap = capacity()
expire_stale(now_ms())
refresh_index(cap)
return 1

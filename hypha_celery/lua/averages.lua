-- Merge a process's moving averages of task durations into the worker's record.
-- KEYS: 1 worker (keys.KeySchema.worker)
-- ARGV: 1 JSON {model: seconds}
local WORKER = KEYS[1]
local AVERAGES = ARGV[1]

if redis.call('EXISTS', WORKER) == 0 then return 0 end
local raw = redis.call('HGET', WORKER, 'avg_inference_time')
local avg = {}
if raw and raw ~= '{}' and raw ~= '[]' then avg = cjson.decode(raw) end
for model, seconds in pairs(cjson.decode(AVERAGES)) do avg[model] = seconds end
redis.call('HSET', WORKER, 'avg_inference_time', cjson.encode(avg))
return 1

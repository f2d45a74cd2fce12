-- Merge a process's moving averages of task durations into the worker's record.
-- KEYS: 1 worker hash. ARGV: 1 JSON {model: seconds}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], 'avg_inference_time')
local avg = {}
if raw and raw ~= '{}' and raw ~= '[]' then avg = cjson.decode(raw) end
for model, seconds in pairs(cjson.decode(ARGV[1])) do avg[model] = seconds end
redis.call('HSET', KEYS[1], 'avg_inference_time', cjson.encode(avg))
return 1

-- Fold one task duration into the worker's moving average for a model.
-- KEYS: 1 worker hash. ARGV: 1 model, 2 seconds, 3 alpha
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], 'avg_inference_time')
local avg = {}
if raw and raw ~= '{}' then avg = cjson.decode(raw) end
local old, x, alpha = avg[ARGV[1]], tonumber(ARGV[2]), tonumber(ARGV[3])
if old == nil then avg[ARGV[1]] = x else avg[ARGV[1]] = old + alpha * (x - old) end
redis.call('HSET', KEYS[1], 'avg_inference_time', cjson.encode(avg))
return 1

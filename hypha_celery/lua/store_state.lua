-- Store a task's state as Celery's Redis result backend does (SET or SETEX, then PUBLISH on the same key),
-- unless a SUCCESS is stored there already: Celery's own rule, read and written here in one atomic step
-- instead of a GET round trip before the write.
-- KEYS: 1 the task's meta key (Celery's celery-task-meta-<id>)
-- ARGV: 1 the encoded meta (JSON), 2 seconds to keep it (0: no expiry)
-- Returns 1 when stored, 0 when a stored SUCCESS was kept; an error when the stored meta is not JSON
-- (the caller then falls back to Celery's own read and write).
local META = KEYS[1]
local VALUE = ARGV[1]
local EXPIRES = tonumber(ARGV[2])

local current = redis.call('GET', META)
-- Celery's meta begins with its status, so the prefix settles it without decoding a large result;
-- anything else is decoded.
if current and string.sub(current, 1, 21) == '{"status": "SUCCESS",' then return 0 end
if current and string.sub(current, 1, 12) ~= '{"status": "' then
  local ok, stored = pcall(cjson.decode, current)
  if not ok or type(stored) ~= 'table' then
    return redis.error_reply('HYPHA_NOT_JSON the stored meta is not JSON')
  end
  if stored['status'] == 'SUCCESS' then return 0 end
end
if EXPIRES > 0 then
  redis.call('SETEX', META, EXPIRES, VALUE)
else
  redis.call('SET', META, VALUE)
end
redis.call('PUBLISH', META, VALUE)
return 1

-- Take one token from a key's bucket, refilled continuously at RATE a second up to BURST.
-- KEYS: 1 the bucket (a hash: tokens, at)
-- ARGV: 1 rate (tokens a second), 2 burst (most tokens held)
-- Returns {1, 0} when a token was taken, {0, ms until one is} when not. Time is the Redis server's.
local BUCKET = KEYS[1]
local RATE = tonumber(ARGV[1])
local BURST = tonumber(ARGV[2])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', BUCKET, 'tokens', 'at')
local tokens = tonumber(state[1]) or BURST
local at = tonumber(state[2]) or now
tokens = math.min(BURST, tokens + math.max(0, now - at) * RATE / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / RATE)
end
redis.call('HSET', BUCKET, 'tokens', tostring(tokens), 'at', now)
-- a full bucket is the same as none: let it expire once it would be full again
redis.call('PEXPIRE', BUCKET, math.ceil((BURST - tokens) * 1000 / RATE) + 1000)
return {allowed, wait}

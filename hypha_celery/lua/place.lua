-- Choose a live worker whose node fits a request, best fit first.
-- KEYS: 1 free_memory, 2 free_core_milli, 3 free_whole_cores, 4 free_gpus, 5 free_gpu_memory,
--       6 cap_memory, 7 cap_cores, 8 cap_gpus, 9 cap_gpu_memory
-- ARGV: 1 mode ('free' = fits now, 'capacity' = could ever fit), 2 memory, 3 cpu_milli,
--       4 gpus, 5 gpu_memory, 6 exclude worker id, 7 key prefix, 8 scan limit
-- Returns {node, worker} or {} when nothing fits.
local mode, mem, milli = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ngpu, gmem, exclude, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local limit = tonumber(ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

local MEM, GPUS, GMEM = 1, 4, 5
if mode == 'capacity' then MEM, GPUS, GMEM = 6, 8, 9 end

local function score(index, node)
  return tonumber(redis.call('ZSCORE', KEYS[index], node) or '-1')
end

local function fits(node)
  if score(MEM, node) < mem then return false end
  if mode == 'capacity' then
    if score(7, node) < math.max(1, math.ceil(milli / 1000)) then return false end
  elseif milli >= 1000 then
    if score(3, node) < milli / 1000 then return false end
  elseif score(2, node) < milli then
    return false
  end
  if ngpu > 0 then
    if score(GMEM, node) < gmem then return false end
    if score(GPUS, node) < ngpu and not (mode == 'free' and ngpu == 1 and gmem > 0) then return false end
  end
  return true
end

local function live_worker(node)
  local key = prefix .. ':node:' .. node .. ':workers'
  local workers = redis.call('ZRANGEBYSCORE', key, now, '+inf')
  for _, w in ipairs(workers) do
    if w ~= exclude then return w end
  end
  -- No worker has advertised this node for 3 intervals: it leaves the indexes (a worker
  -- that comes back puts it in again, see NodeStep's monitor).
  if redis.call('EXISTS', key) == 0 then
    for i = 1, 9 do redis.call('ZREM', KEYS[i], node) end
  end
  return nil
end

-- Walk the scarcest resource's index upwards: the first node that fits is the tightest fit.
local primary, floor = MEM, mem
if ngpu > 0 and gmem > 0 then primary, floor = GMEM, gmem
elseif ngpu > 0 then primary, floor = GPUS, ngpu
elseif mem == 0 then
  if mode == 'capacity' then primary, floor = 7, math.max(1, math.ceil(milli / 1000))
  elseif milli >= 1000 then primary, floor = 3, milli / 1000
  else primary, floor = 2, milli end
end
local offset, page = 0, 100
while offset < limit do
  local nodes = redis.call('ZRANGEBYSCORE', KEYS[primary], floor, '+inf', 'LIMIT', offset, page)
  if #nodes == 0 then break end
  for _, node in ipairs(nodes) do
    if fits(node) then
      local worker = live_worker(node)
      if worker then return {node, worker} end
    end
  end
  offset = offset + #nodes
end
return {}

-- Choose a live worker whose node fits a request, best fit first.
-- KEYS (keys.KeySchema.placement, in this order):
--   1 free_memory, 2 free_core_milli, 3 free_whole_cores, 4 free_gpus, 5 free_gpu_memory,
--   6 cap_memory, 7 cap_cores, 8 cap_gpus, 9 cap_gpu_memory,
--   10 workers (keys.KeySchema.workers: the live index, worker -> expiry),
--   11... preferred holders, best first (keys.KeySchema.model_workers: membership only), may be none
-- ARGV: 1 mode ('free' = fits now, 'capacity' = could ever fit), 2 memory, 3 cpu_milli,
--       4 gpus, 5 gpu_memory, 6 exclude worker id, 7 scan limit,
--       8, 9 what comes before and after the node in a node's workers key (keys.KeySchema.node_workers_affixes)
--       10, 11 what comes before and after the worker id in its record's key (keys.KeySchema.worker_affixes)
-- Returns {node, worker} or {} when nothing fits. In 'free' mode a live holder in the first
-- preferred set whose node fits wins (the tightest fit among them), then the next set's, then best fit.
local FREE_MEMORY = KEYS[1]
local FREE_CORE_MILLI = KEYS[2]
local FREE_WHOLE_CORES = KEYS[3]
local FREE_GPUS = KEYS[4]
local FREE_GPU_MEMORY = KEYS[5]
local CAP_MEMORY = KEYS[6]
local CAP_CORES = KEYS[7]
local CAP_GPUS = KEYS[8]
local CAP_GPU_MEMORY = KEYS[9]
local MODE = ARGV[1]
local MEMORY = tonumber(ARGV[2])
local CPU_MILLI = tonumber(ARGV[3])
local NGPU = tonumber(ARGV[4])
local GPU_MEMORY = tonumber(ARGV[5])
local EXCLUDE = ARGV[6]
local SCAN_LIMIT = tonumber(ARGV[7])
local NODE_WORKERS_HEAD = ARGV[8]
local NODE_WORKERS_TAIL = ARGV[9]
local WORKER_HEAD = ARGV[10]
local WORKER_TAIL = ARGV[11]
local WORKERS = KEYS[10]
local HOLDERS = {unpack(KEYS, 11)}

local INDEXES = {FREE_MEMORY, FREE_CORE_MILLI, FREE_WHOLE_CORES, FREE_GPUS, FREE_GPU_MEMORY,
                 CAP_MEMORY, CAP_CORES, CAP_GPUS, CAP_GPU_MEMORY}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

-- The indexes this mode compares against: what is free now, or what a node has in all.
local MEM, GPUS, GMEM = FREE_MEMORY, FREE_GPUS, FREE_GPU_MEMORY
if MODE == 'capacity' then MEM, GPUS, GMEM = CAP_MEMORY, CAP_GPUS, CAP_GPU_MEMORY end

local function score(index, node)
  return tonumber(redis.call('ZSCORE', index, node) or '-1')
end

-- Whether scores read by ``get(index)`` meet every dimension of the request.
local function meets(get)
  if get(MEM) < MEMORY then return false end
  if MODE == 'capacity' then
    if get(CAP_CORES) < math.max(1, math.ceil(CPU_MILLI / 1000)) then return false end
  elseif CPU_MILLI >= 1000 then
    if get(FREE_WHOLE_CORES) < CPU_MILLI / 1000 then return false end
  elseif get(FREE_CORE_MILLI) < CPU_MILLI then
    return false
  end
  if NGPU > 0 then
    if get(GMEM) < GPU_MEMORY then return false end
    if get(GPUS) < NGPU and not (MODE == 'free' and NGPU == 1 and GPU_MEMORY > 0) then return false end
  end
  return true
end

local function fits(node)
  return meets(function(index) return score(index, node) end)
end

-- The highest score in an index (-1 when it is empty): no node scores more.
local function top(index)
  local best = redis.call('ZREVRANGE', index, 0, 0, 'WITHSCORES')
  return tonumber(best[2] or '-1')
end

local function live_worker(node)
  local key = NODE_WORKERS_HEAD .. node .. NODE_WORKERS_TAIL
  local workers = redis.call('ZRANGEBYSCORE', key, now, '+inf')
  for _, w in ipairs(workers) do
    if w ~= EXCLUDE then return w end
  end
  -- No worker has advertised this node for 3 intervals: it leaves the indexes (a worker
  -- that comes back puts it in again, see NodeStep's monitor).
  if redis.call('EXISTS', key) == 0 then
    for _, index in ipairs(INDEXES) do redis.call('ZREM', index, node) end
  end
  return nil
end

-- Every check compares a node's score with a floor, so when the best score of some index is
-- below its floor no node fits: say so at once instead of walking SCAN_LIMIT candidates that all
-- fail (e.g. every core busy while memory is free). The answer is the walk's, without the walk.
if not meets(top) then return {} end

-- Walk the scarcest resource's index upwards: the first node that fits is the tightest fit.
local primary, floor = MEM, MEMORY
if NGPU > 0 and GPU_MEMORY > 0 then primary, floor = GMEM, GPU_MEMORY
elseif NGPU > 0 then primary, floor = GPUS, NGPU
elseif MEMORY == 0 then
  if MODE == 'capacity' then primary, floor = CAP_CORES, math.max(1, math.ceil(CPU_MILLI / 1000))
  elseif CPU_MILLI >= 1000 then primary, floor = FREE_WHOLE_CORES, CPU_MILLI / 1000
  else primary, floor = FREE_CORE_MILLI, CPU_MILLI end
end
-- Workers that hold the model (or an adapter's base): the tightest fit among the first set's live
-- holders, then the next set's. Ties go to the first met. A holder is live while the live index says
-- so; one whose record is gone leaves the set here (a worker that comes back publishes it again).
if MODE == 'free' then
  for _, holders in ipairs(HOLDERS) do
    local best, best_score = nil, nil
    for _, w in ipairs(redis.call('ZRANGE', holders, 0, SCAN_LIMIT - 1)) do
      local record = WORKER_HEAD .. w .. WORKER_TAIL
      if tonumber(redis.call('ZSCORE', WORKERS, w) or '-1') < now then
        if redis.call('EXISTS', record) == 0 then redis.call('ZREM', holders, w) end
      elseif w ~= EXCLUDE then
        local node = redis.call('HGET', record, 'node_id')
        if node and fits(node) then
          local s = score(primary, node)
          if best == nil or s < best_score then best, best_score = {node, w}, s end
        end
      end
    end
    if best then return best end
  end
end

local offset, page = 0, 100
while offset < SCAN_LIMIT do
  local nodes = redis.call('ZRANGEBYSCORE', primary, floor, '+inf', 'LIMIT', offset, page)
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

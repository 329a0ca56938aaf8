-- Claim due polls within the upstream budget (GCRA), in one step: at most as many due ids as
-- the budget allows now, each pushed a lease into the future. Polls are status reads: they use
-- free slots of the status reads' own share first, then free slots of the shared part (which
-- the API also books) while no API call waits for one; they never book ahead.
-- Returns {claimed count, wait hint seconds (string), ids...}; wait -1: nothing is tracked.
local polls_key = KEYS[1]
local tat_key = KEYS[2]          -- the shared part: API calls and status reads
local reads_tat_key = KEYS[3]    -- the status reads' own share
local paused_key = KEYS[4]
local waiting_key = KEYS[5]      -- API calls waiting for the shared part (fair_share.lua)
local max_ids = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local period = tonumber(ARGV[3])        -- the shared part's emission interval (s per call)
local burst = tonumber(ARGV[4])
local reads_period = tonumber(ARGV[5])  -- the reads share's; 0: there is no such share
local reads_burst = tonumber(ARGV[6])

local paused = tonumber(redis.call('GET', paused_key) or '0')
if paused > now then return {0, tostring(paused - now)} end
local ids = redis.call('ZRANGEBYSCORE', polls_key, '-inf', now, 'LIMIT', 0, max_ids)
if #ids == 0 then
  local head = redis.call('ZRANGE', polls_key, 0, 0, 'WITHSCORES')
  if #head == 0 then return {0, '-1'} end
  return {0, tostring(tonumber(head[2]) - now)}
end

-- Calls a bucket allows right now, its arrival time, and the wait until its next free slot.
local function free(key, p, b)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  -- Differences first: at ~1.8e9 s a double resolves ~0.2 us, so (now + x - tat) loses x's
  -- precision; the epsilon (a thousandth of a request) absorbs what remains.
  local allowed = math.max(0, math.floor((now - tat) / p + b + 1e-3))
  return allowed, tat, tat + p - b * p - now
end

local function book(key, tat, p, n)
  if n < 1 then return end
  tat = tat + n * p
  -- %.17g: tostring keeps 14 digits, ~0.1 ms at this magnitude, too coarse at high rates.
  redis.call('SET', key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end

local shared, shared_tat, shared_wait = free(tat_key, period, burst)
-- A free slot of the shared part is the waiting API calls' (their next look books it).
if redis.call('EXISTS', waiting_key) == 1 then shared = 0 end
local reads, reads_tat, reads_wait = 0, now, shared_wait
if reads_period > 0 then
  reads, reads_tat, reads_wait = free(reads_tat_key, reads_period, reads_burst)
end
if shared + reads < 1 then return {0, tostring(math.min(shared_wait, reads_wait))} end
local n = math.min(shared + reads, #ids)
local from_reads = math.min(n, reads)
book(reads_tat_key, reads_tat, reads_period, from_reads)
book(tat_key, shared_tat, period, n - from_reads)
local lease_until = now + lease
local out = {n, '0'}
for i = 1, n do
  redis.call('ZADD', polls_key, lease_until, ids[i])
  out[#out + 1] = ids[i]
end
return out

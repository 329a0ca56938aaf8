-- Book the earliest slot of the upstream budget (GCRA, the same keys as claim.lua) for one status
-- read that is not a queued poll, such as a list page: the earlier of the status reads' own
-- share and the shared part (which the API books ahead too). Booking ahead, rather than taking
-- only a free slot as polls do, puts the read ahead of per-id polls; its own share keeps it from
-- waiting behind the API's bookings.
-- Returns {1, seconds to wait before calling} once booked, or {0, seconds until the 429 pause
-- ends} when nobody may call now.
local tat_key = KEYS[1]          -- the shared part: API calls and status reads
local reads_tat_key = KEYS[2]    -- the status reads' own share
local paused_key = KEYS[3]
local period = tonumber(ARGV[1])        -- the shared part's emission interval (s per call)
local burst = tonumber(ARGV[2])
local reads_period = tonumber(ARGV[3])  -- the reads share's; 0: there is no such share
local reads_burst = tonumber(ARGV[4])

local paused = tonumber(redis.call('GET', paused_key) or '0')
if paused > now then return {0, tostring(paused - now)} end

-- When a bucket's next slot comes (claim.lua allows a call once now >= tat + p - b * p), and
-- its arrival time.
local function slot(key, p, b)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  return math.max(now, tat + p - b * p), tat
end

local at, tat = slot(tat_key, period, burst)
local key, p = tat_key, period
if reads_period > 0 then
  local reads_at, reads_tat = slot(reads_tat_key, reads_period, reads_burst)
  if reads_at <= at then at, tat, key, p = reads_at, reads_tat, reads_tat_key, reads_period end
end
tat = tat + p
redis.call('SET', key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return {1, string.format('%.17g', at - now)}

-- Book a slot of the upstream budget (GCRA, the same keys as schedule.claim.lua) for one
-- status read that is not a queued poll, such as a list page: a slot of the status reads' own
-- share, now or ahead; or the next slot of the shared part while nobody has booked beyond it
-- and no API call waits in the fair queue (the API books that part ahead: a read never takes a
-- slot from a waiting API call, and delays the next one by a slot at most). Booking ahead, rather than claiming only a free slot
-- as polls do, puts the read ahead of per-id polls.
-- Returns {1, seconds to wait before calling} once booked, {0, seconds until the 429 pause
-- ends} when nobody may call now, or {2, seconds until the shared part may have a slot} when
-- nothing was booked yet: ask again then.
local tat_key = KEYS[1]          -- the shared part: API calls and status reads
local reads_tat_key = KEYS[2]    -- the status reads' own share
local paused_key = KEYS[3]
local waiting_key = KEYS[4]      -- API calls waiting for the shared part (fair_share.lua)
local period = tonumber(ARGV[1])        -- the shared part's emission interval (s per call)
local burst = tonumber(ARGV[2])
local reads_period = tonumber(ARGV[3])  -- the reads share's; 0: there is no such share
local reads_burst = tonumber(ARGV[4])

local paused = tonumber(redis.call('GET', paused_key) or '0')
if paused > now then return {0, tostring(paused - now)} end

-- When a bucket's next slot comes (schedule.claim.lua allows a call once
-- now >= tat + p - b * p), and its arrival time.
local function slot(key, p, b)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  return math.max(now, tat + p - b * p), tat
end

local function book(key, at, tat, p)
  tat = tat + p
  redis.call('SET', key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
  return {1, string.format('%.17g', at - now)}
end

local shared_at, shared_tat = slot(tat_key, period, burst)
-- API calls waiting in the fair queue get the shared part's slots as they come.
local waiting = redis.call('EXISTS', waiting_key) == 1
if reads_period > 0 then
  local reads_at, reads_tat = slot(reads_tat_key, reads_period, reads_burst)
  -- The reads' own slot when it is free now or comes no later than a shared one (or API calls
  -- wait for those); else the shared part's next slot if nobody waits for it (what the API
  -- leaves unused is the reads').
  if reads_at <= now or reads_at <= shared_at or waiting then
    return book(reads_tat_key, reads_at, reads_tat, reads_period)
  end
end
if shared_at <= now + period and not waiting then
  return book(tat_key, shared_at, shared_tat, period)
end
return {2, string.format('%.17g', math.max(period, shared_at - period - now))}

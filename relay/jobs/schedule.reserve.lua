-- Book the shared budget's next slot (GCRA, the same keys as claim.lua) for one call that is
-- not a queued poll, such as a list page. Returns {1, seconds to wait before calling} once
-- booked, or {0, seconds until the 429 pause ends} when nobody may call now.
local tat_key = KEYS[1]
local paused_key = KEYS[2]
local period = tonumber(ARGV[1])   -- emission interval: seconds per upstream call
local burst = tonumber(ARGV[2])

local paused = tonumber(redis.call('GET', paused_key) or '0')
if paused > now then return {0, tostring(paused - now)} end
local tat = tonumber(redis.call('GET', tat_key) or '0')
if tat < now then tat = now end
-- claim.lua allows a call once now >= tat + period - burst * period; this is that moment.
local at = math.max(now, tat + period - burst * period)
tat = tat + period
redis.call('SET', tat_key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return {1, string.format('%.17g', at - now)}

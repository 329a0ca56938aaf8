-- Book the shared budget's next slot (GCRA, the same keys as claim.lua and reserve.lua) for an
-- API call, but only when that slot comes within `max_wait` seconds; during a 429 pause the
-- first slot is at the pause's end (a caller waits out a short pause rather than hear 429).
-- Returns {1, seconds to wait before calling} once booked, else {0, seconds until a slot (or
-- the end of the pause)}: nothing is booked then, so a refused caller costs the budget nothing.
local tat_key = KEYS[1]
local paused_key = KEYS[2]
local period = tonumber(ARGV[1])   -- emission interval: seconds per upstream call
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])

local start = math.max(now, tonumber(redis.call('GET', paused_key) or '0'))
local tat = tonumber(redis.call('GET', tat_key) or '0')
if tat < start then tat = start end
local at = math.max(start, tat + period - burst * period)
if at - now > max_wait then return {0, string.format('%.17g', at - now)} end
tat = tat + period
redis.call('SET', tat_key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return {1, string.format('%.17g', at - now)}

-- Pause every worker's upstream calls for `seconds` (after a 429). Only ever extends a pause.
local paused_key = KEYS[1]
local seconds = tonumber(ARGV[1])

local until_ = now + seconds
local current = tonumber(redis.call('GET', paused_key) or '0')
if until_ > current then
  redis.call('SET', paused_key, string.format('%.17g', until_), 'PX', math.ceil(seconds * 1000) + 1000)
end
return 1

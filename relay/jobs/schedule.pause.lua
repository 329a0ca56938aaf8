-- Pause every worker's upstream calls for `seconds` (after a 429). Only ever extends a pause.
-- Each 429 is also counted in the current minute's `rate_limited` stat (relay.delivery.stats
-- keeps the same per-minute keys), for the console.
local paused_key = KEYS[1]
local seconds = tonumber(ARGV[1])
local stats_prefix = ARGV[2]
local keep_seconds = tonumber(ARGV[3])

local counted = stats_prefix .. 'rate_limited:' .. math.floor(now / 60)
redis.call('INCR', counted)
redis.call('EXPIRE', counted, keep_seconds)

local until_ = now + seconds
local current = tonumber(redis.call('GET', paused_key) or '0')
if until_ > current then
  redis.call('SET', paused_key, string.format('%.17g', until_), 'PX', math.ceil(seconds * 1000) + 1000)
end
return 1

-- Half-open: a backed-off destination whose back-off has ended is tried by one attempt, its
-- probe, while the others wait. Asked only by a worker that last saw the destination backed
-- off (a closed breaker costs no round trip). The probe holds the destination backed off for
-- `hold` seconds (its attempt's longest life), so a probe whose worker died is replaced then;
-- its outcome (store.record_outcome.lua) closes the breaker or backs it off again.
-- Returns {1 if the attempt may be made else 0, seconds to wait}: {1, 0} closed, {1, w} the
-- probe (held for `hold`; another attempt asking then waits w), {0, w} backed off, or probed.
local destination_key = KEYS[1]
local backed_off_key = KEYS[2]    -- zset: destination -> backed off until
local destination = ARGV[1]
local hold = tonumber(ARGV[2])
local wait = tonumber(ARGV[3])    -- the most an attempt waits while another probes

local until_at = redis.call('ZSCORE', backed_off_key, destination)
if not until_at then return {1, '0'} end
local left = tonumber(until_at) - now
if left > 0 then
  if redis.call('HEXISTS', destination_key, 'probe') == 1 then left = math.min(left, wait) end
  return {0, tostring(left)}
end
redis.call('ZADD', backed_off_key, now + hold, destination)
redis.call('HSET', destination_key, 'probe', '1')
redis.call('EXPIRE', destination_key, math.ceil(hold) + 86400)
return {1, tostring(math.min(hold, wait))}

-- Claim due polls within the shared upstream budget (GCRA), in one step: at most as many due
-- ids as the budget allows now, each pushed a lease into the future.
-- Returns {claimed count, wait hint seconds (string), ids...}; wait -1: nothing is tracked.
local polls_key = KEYS[1]
local tat_key = KEYS[2]
local paused_key = KEYS[3]
local max_ids = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local period = tonumber(ARGV[3])   -- emission interval: seconds per upstream call
local burst = tonumber(ARGV[4])

local paused = tonumber(redis.call('GET', paused_key) or '0')
if paused > now then return {0, tostring(paused - now)} end
local ids = redis.call('ZRANGEBYSCORE', polls_key, '-inf', now, 'LIMIT', 0, max_ids)
if #ids == 0 then
  local head = redis.call('ZRANGE', polls_key, 0, 0, 'WITHSCORES')
  if #head == 0 then return {0, '-1'} end
  return {0, tostring(tonumber(head[2]) - now)}
end
local tat = tonumber(redis.call('GET', tat_key) or '0')
if tat < now then tat = now end
-- Differences first: at ~1.8e9 s a double resolves ~0.2 us, so (now + x - tat) loses x's
-- precision; the epsilon (a thousandth of a request) absorbs what remains.
local allowed = math.floor((now - tat) / period + burst + 1e-3)
if allowed < 1 then return {0, tostring(tat + period - burst * period - now)} end
local n = math.min(allowed, #ids)
tat = tat + n * period
-- %.17g: tostring keeps 14 digits, ~0.1 ms at this magnitude, too coarse at high rates.
redis.call('SET', tat_key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
local lease_until = now + lease
local out = {n, '0'}
for i = 1, n do
  redis.call('ZADD', polls_key, lease_until, ids[i])
  out[#out + 1] = ids[i]
end
return out

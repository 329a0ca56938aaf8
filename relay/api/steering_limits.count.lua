-- Count one steering request (a redeliver, a recover) for a caller; its window is the minute
-- from its first request in it. Returns 0 when it may go ahead, else the milliseconds until the
-- window ends.
local count_key = KEYS[1]
local per_minute = tonumber(ARGV[1])

local count = redis.call('INCR', count_key)
if count == 1 then redis.call('PEXPIRE', count_key, 60000) end
if count > per_minute then return math.max(1, redis.call('PTTL', count_key)) end
return 0

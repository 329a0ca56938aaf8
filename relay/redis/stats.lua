-- Count one delivery outcome in the current minute (Redis clock); the key expires on its own.
local prefix = ARGV[1]
local outcome = ARGV[2]
local keep_seconds = tonumber(ARGV[3])

local key = prefix .. outcome .. ':' .. math.floor(now / 60)
redis.call('INCR', key)
redis.call('EXPIRE', key, keep_seconds)
return 1

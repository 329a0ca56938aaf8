-- Stamp one worker alive for `lasts` more seconds, or (lasts = 0) take it out at once. Workers
-- whose stamp ran out are dropped, so the set holds the live ones and a few just gone.
local workers_key = KEYS[1]
local member = ARGV[1]
local lasts = tonumber(ARGV[2])

redis.call('ZREMRANGEBYSCORE', workers_key, '-inf', now)
if lasts > 0 then
  redis.call('ZADD', workers_key, now + lasts, member)
else
  redis.call('ZREM', workers_key, member)
end
return 1

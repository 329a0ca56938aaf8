-- Record a delivery attempt's outcome, only if the job still waits on that attempt (a re-run
-- of an old attempt after a crash changes nothing). The hash lives at least `keep_for` more
-- seconds, so a next attempt deferred by Retry-After still finds it.
local job_key = KEYS[1]
local attempt = ARGV[1]
local next_attempt = ARGV[2]
local state = ARGV[3]
local result = ARGV[4]
local keep_for = tonumber(ARGV[5])

if redis.call('HGET', job_key, 'delivery') ~= 'pending' then return 0 end
if redis.call('HGET', job_key, 'attempt') ~= attempt then return 0 end
redis.call('HSET', job_key, 'attempt', next_attempt, 'delivery', state, 'last_result', result)
redis.call('HINCRBY', job_key, 'attempts_made', 1)
if redis.call('TTL', job_key) < keep_for then redis.call('EXPIRE', job_key, keep_for) end
return 1

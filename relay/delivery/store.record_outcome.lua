-- Record a delivery attempt's outcome, only if the job still waits on that attempt (a re-run
-- of an old attempt after a crash changes nothing). The hash lives at least `keep_for` more
-- seconds, so a next attempt deferred by Retry-After still finds it. The attempt's arq job
-- (the guard of an attempt made in-process) is removed: nothing is left to run for it.
-- Whatever the job's state, the destination's breaker learns from the outcome: an answer
-- closes it; `threshold` failures in a row back the destination off, for `base` seconds
-- doubling up to `max_backoff` (a failure ends any probe: store.claim_probe.lua).
-- A recorded outcome is one of the job's events (relay.jobs.history), its last when it settles
-- the final event's delivery.
-- Returns {1 if recorded else 0, seconds the destination is backed off for (0: it is not)}.
local job_key = KEYS[1]           -- the delivery's hash: the job's, or an early event's own
local destination_key = KEYS[2]
local backed_off_key = KEYS[3]    -- zset: destination -> backed off until
local arq_queue_key = KEYS[4]
local arq_job_key = KEYS[5]
local owner_job_key = KEYS[6]     -- the job's hash (the same as job_key for its final event)
local attempt = ARGV[1]
local next_attempt = ARGV[2]
local state = ARGV[3]
local result = ARGV[4]
local keep_for = tonumber(ARGV[5])
local destination = ARGV[6]
local answered = ARGV[7] == '1'
local threshold = tonumber(ARGV[8])
local base = tonumber(ARGV[9])
local max_backoff = tonumber(ARGV[10])
local arq_job_id = ARGV[11]
local request_id = ARGV[12]       -- the job's
local event_type = ARGV[13]       -- the delivered event's type ('lipsync.completed', ...)

local backed_off_for = 0
if answered then
  if redis.call('DEL', destination_key) == 1 then redis.call('ZREM', backed_off_key, destination) end
else
  redis.call('HDEL', destination_key, 'probe')
  local failures = redis.call('HINCRBY', destination_key, 'failures', 1)
  if failures >= threshold then
    backed_off_for = math.min(base * 2 ^ (failures - threshold), max_backoff)
    redis.call('ZADD', backed_off_key, now + backed_off_for, destination)
  end
  redis.call('EXPIRE', destination_key, math.ceil(max_backoff) + 86400)
  -- Forget destinations nobody has tried for a day, so the set stays bounded.
  redis.call('ZREMRANGEBYSCORE', backed_off_key, '-inf', now - 86400)
end

if redis.call('HGET', job_key, 'delivery') ~= 'pending' then return {0, tostring(backed_off_for)} end
if redis.call('HGET', job_key, 'attempt') ~= attempt then return {0, tostring(backed_off_for)} end
redis.call('HSET', job_key, 'attempt', next_attempt, 'delivery', state, 'last_result', result)
redis.call('HINCRBY', job_key, 'attempts_made', 1)
if redis.call('TTL', job_key) < keep_for then redis.call('EXPIRE', job_key, keep_for) end
redis.call('ZREM', arq_queue_key, arq_job_id)
redis.call('DEL', arq_job_key)
local outcome = state
if state == 'pending' then outcome = 'failing' end
history_append(owner_job_key, request_id,
               string.format('{"type":"delivery","event":%s,"attempt":%d,"outcome":"%s","result":%s}',
                             cjson.encode(event_type), tonumber(attempt), outcome, cjson.encode(result)),
               false, state ~= 'pending' and owner_job_key == job_key)
return {1, tostring(backed_off_for)}

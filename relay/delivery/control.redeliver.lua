-- Make an ended job's delivery pending again at a fresh attempt number, which also restarts
-- the retry schedule there (schedule_base). The job lives at least `keep_for` more seconds.
-- With `leave_pending` (a bulk recover), a delivery still pending (waiting for its first attempt
-- or retrying on its schedule) is left alone: recovering it again and again would restart its
-- schedule each time and send it again at once.
-- Returns the new attempt number, or -1 (no such job), -2 (not ended yet), -3 (no callback),
-- -4 (pending, left alone).
local job_key = KEYS[1]
local keep_for = tonumber(ARGV[1])
local leave_pending = ARGV[2] == '1'

if redis.call('EXISTS', job_key) == 0 then return -1 end
if redis.call('HEXISTS', job_key, 'event') == 0 then return -2 end
local callback_url = redis.call('HGET', job_key, 'callback_url')
if not callback_url or callback_url == '' then return -3 end
if leave_pending and redis.call('HGET', job_key, 'delivery') == 'pending' then return -4 end
local attempt = tonumber(redis.call('HGET', job_key, 'attempt') or '0') + 1
redis.call('HSET', job_key, 'delivery', 'pending', 'attempt', attempt, 'schedule_base', attempt)
if redis.call('TTL', job_key) < keep_for then redis.call('EXPIRE', job_key, keep_for) end
return attempt

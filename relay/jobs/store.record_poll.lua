-- Store a poll result that did not end the job, and when to poll it next. Dropped (returns 0)
-- once the job has ended or left the queue: a slow worker never overwrites newer state.
local job_key = KEYS[1]
local polls_key = KEYS[2]
local request_id = ARGV[1]
local next_in = tonumber(ARGV[2])
local interval = ARGV[3]
local status = ARGV[4]            -- '' = unchanged
local body = ARGV[5]
local not_found_since = ARGV[6]   -- '' = found

-- A job whose hash is gone (expired, evicted) is not written back half-made.
if redis.call('EXISTS', job_key) == 0 then return 0 end
if redis.call('HEXISTS', job_key, 'event') == 1 then return 0 end
if not redis.call('ZSCORE', polls_key, request_id) then return 0 end
redis.call('HSET', job_key, 'interval', interval, 'not_found_since', not_found_since,
           'polled', now)
if status ~= '' then
  -- The status timeline: one `status@time` entry per change, for the console's job page.
  if redis.call('HGET', job_key, 'status') ~= status then
    local timeline = redis.call('HGET', job_key, 'timeline') or ''
    redis.call('HSET', job_key, 'timeline', timeline .. string.format(';%s@%.3f', status, now))
    history_append(job_key, request_id,
                   '{"type":"status","status":' .. cjson.encode(status) .. '}', false, false)
  end
  redis.call('HSET', job_key, 'status', status, 'body', body)
end
redis.call('ZADD', polls_key, 'XX', now + next_in, request_id)
return 1

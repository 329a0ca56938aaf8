-- Enqueue an arq job unless one with its id is queued, running or kept as a result: what
-- arq's enqueue_job does with WATCH, EXISTS and MULTI, in one round trip. Returns 1 if queued.
local job_key = KEYS[1]
local result_key = KEYS[2]
local queue_key = KEYS[3]
local job_id = ARGV[1]
local payload = ARGV[2]    -- serialized by arq.jobs.serialize_job
local score = ARGV[3]      -- when it is due, ms, on the enqueuing worker's clock (as arq's)
local expires_ms = ARGV[4]

if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
redis.call('PSETEX', job_key, expires_ms, payload)
redis.call('ZADD', queue_key, score, job_id)
return 1

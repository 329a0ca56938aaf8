-- Enqueue an arq job unless one with its id is queued, running or kept as a result: what
-- arq's enqueue_job does with WATCH, EXISTS and MULTI, in one round trip. Returns 1 if queued.
local job_key = KEYS[1]
local result_key = KEYS[2]
local queue_key = KEYS[3]
local job_id = ARGV[1]
local payload = ARGV[2]    -- serialized by arq.jobs.serialize_job
local defer_ms = tonumber(ARGV[3])   -- how long from now it is due
local expires_ms = ARGV[4]

if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
redis.call('PSETEX', job_key, expires_ms, payload)
-- Scored on Redis's clock, in ms as arq scores: workers compare it with the same clock
-- (relay.clock), whatever their own clocks say.
redis.call('ZADD', queue_key, math.floor(now * 1000) + defer_ms, job_id)
return 1

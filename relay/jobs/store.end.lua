-- Fix a job's final state and callback payload, once: returns 1 when this call ended it,
-- 2 when it had already ended (the first end wins), 0 when the job is gone. Whichever, the job
-- leaves the poll queue in the same step.
-- Ended jobs are kept for days, so the record shrinks to what status reads and delivery need:
-- the polling fields go, and the event is stored without its data when that is the body
-- (relay.jobs.store puts it back together). Its event, the job's last when nothing is to be
-- delivered, is shown with the body as `data` (kept once, in the hash); the callback body is
-- stamped with its sequence.
local job_key = KEYS[1]
local ref_key = KEYS[2]           -- the job key again when there is no reference_id
local created_key = KEYS[3]
local pending_key = KEYS[4]       -- the delivery state index's pending set
local polls_key = KEYS[5]
local outstanding_key = KEYS[6]   -- the caller's jobs not yet ended; the job key again without one
local request_id = ARGV[1]
local status = ARGV[2]
local body = ARGV[3]
local event_id = ARGV[4]
local event = ARGV[5]             -- the whole event, or its head when it ends in the body
local delivery = ARGV[6]
local retention = ARGV[7]
local has_ref = ARGV[8] == '1'

local function unschedule()
  redis.call('ZREM', polls_key, request_id)
  redis.call('ZREM', created_key, request_id)
  if outstanding_key ~= job_key then redis.call('ZREM', outstanding_key, request_id) end
end

if redis.call('EXISTS', job_key) == 0 then unschedule() return 0 end
if redis.call('HEXISTS', job_key, 'event') == 1 then unschedule() return 2 end
-- The first write is the job's own: under maxmemory a full Redis refuses it, and so the whole
-- script (only a script's first write is checked), leaving the job to be polled again.
local timeline = redis.call('HGET', job_key, 'timeline') or ''
redis.call('HSET', job_key, 'status', status, 'body', body, 'event_id', event_id,
           'delivery', delivery, 'attempt', 0, 'ended', now,
           'timeline', timeline .. string.format(';%s@%.3f', status, now))
-- reference_id stays: the console and status reads show it; `created` lives on in the timeline.
redis.call('HDEL', job_key, 'created', 'interval', 'not_found_since', 'polled')
redis.call('EXPIRE', job_key, retention)
local sequence = history_append(
  job_key, request_id,
  '{"type":"status","status":' .. cjson.encode(status) .. ',"with_body":true}',
  true, delivery ~= 'pending')
redis.call('HSET', job_key, 'event', history_stamp(event, sequence))
unschedule()
if has_ref and redis.call('GET', ref_key) == request_id then
  redis.call('EXPIRE', ref_key, retention)
end
-- Filed as pending from the start: a first attempt that never gets queued (its worker died
-- right after this script) is then found by the stranded-delivery sweep.
if delivery == 'pending' then redis.call('ZADD', pending_key, now, request_id) end
return 1

-- Start delivering an event sent before the job ends (lipsync.processing): a delivery record
-- of its own, `{request_id}#{kind}`, shaped like a job's so the deliverer needs nothing new.
-- Once, and only while the job is still running. Returns 1 when this call created it.
-- The status it tells of is recorded here too, with its event (relay.jobs.history), so the
-- callback carries that event's sequence number; the poll's own record then finds the status
-- unchanged.
local job_key = KEYS[1]
local delivery_key = KEYS[2]
local pending_key = KEYS[3]       -- the delivery state index's pending set
local delivery_id = ARGV[1]
local callback_url = ARGV[2]
local event_id = ARGV[3]
local event = ARGV[4]
local retention = ARGV[5]
local request_id = ARGV[6]
local status = ARGV[7]            -- the job's status the event tells of ('processing')
local trace = ARGV[8]             -- the job's trace context, for the attempts' spans; '' = none

if redis.call('HEXISTS', job_key, 'event') == 1 then return 0 end
if redis.call('EXISTS', delivery_key) == 1 then return 0 end
if redis.call('EXISTS', job_key) == 0 then return 0 end
if redis.call('HGET', job_key, 'status') ~= status then
  local timeline = redis.call('HGET', job_key, 'timeline') or ''
  redis.call('HSET', job_key, 'status', status,
             'timeline', timeline .. string.format(';%s@%.3f', status, now))
  history_append(job_key, request_id,
                 '{"type":"status","status":' .. cjson.encode(status) .. '}', false, false)
end
local sequence = redis.call('HGET', job_key, 'sequence') or '0'
redis.call('HSET', delivery_key, 'created', now, 'ended', now, 'callback_url', callback_url,
           'event_id', event_id, 'event', history_stamp(event, sequence), 'delivery', 'pending',
           'attempt', 0)
if trace ~= '' then redis.call('HSET', delivery_key, 'trace', trace) end
-- Whose it is: its callback is signed for that caller (relay.delivery.signers).
local caller = redis.call('HGET', job_key, 'caller')
if caller then redis.call('HSET', delivery_key, 'caller', caller) end
redis.call('EXPIRE', delivery_key, retention)
redis.call('ZADD', pending_key, now, delivery_id)
return 1

-- Ordering a job's events: an early event (lipsync.processing) may be sent only while the job
-- has not ended. Claimed, it holds the job's sending key for the attempt; the final event's
-- attempts wait while that key exists. Refused, the early event is marked stale and leaves
-- the state index: it is never sent after the final one.
-- Returns 1 when the send may go ahead, 0 when the event is stale.
local job_key = KEYS[1]
local delivery_key = KEYS[2]
local sending_key = KEYS[3]
local index_prefix = ARGV[1]
local delivery_id = ARGV[2]
local hold_ms = tonumber(ARGV[3])

if redis.call('HEXISTS', job_key, 'event') == 1 then
  redis.call('HSET', delivery_key, 'delivery', 'stale')
  for _, name in ipairs({'pending', 'failing'}) do
    redis.call('ZREM', index_prefix .. name, delivery_id)
  end
  return 0
end
redis.call('SET', sending_key, delivery_id, 'PX', hold_ms)
return 1

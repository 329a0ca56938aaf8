-- Append one entry to a delivery's attempt log and file the delivery under its state.
-- The log lives as long as the job (same TTL), keeps its newest `max_entries`, and each entry
-- gets the Redis-clock time. The state index holds every delivery once, in the set of its
-- current state, scored by when it got there; entries older than `retention` are dropped.
local job_key = KEYS[1]
local log_key = KEYS[2]
local index_prefix = ARGV[1]   -- 'relay:deliveries:'
local delivery_id = ARGV[2]
local entry = ARGV[3]          -- JSON object without its time: '{...}'
local max_entries = tonumber(ARGV[4])
local retention = tonumber(ARGV[5])

local delivery = redis.call('HGET', job_key, 'delivery')
if not delivery then return 0 end
-- Pending after a failed attempt is failing; pending at the (re)start of the schedule is not.
local attempt = tonumber(redis.call('HGET', job_key, 'attempt') or '0')
local base = tonumber(redis.call('HGET', job_key, 'schedule_base') or '0')
local state = delivery
if delivery == 'pending' and attempt > base then state = 'failing' end

local stamped = '{"at":' .. string.format('%.6f', now) .. ',' .. string.sub(entry, 2)
redis.call('RPUSH', log_key, stamped)
redis.call('LTRIM', log_key, -max_entries, -1)
local ttl = redis.call('TTL', job_key)
if ttl > 0 then redis.call('EXPIRE', log_key, ttl) end

for _, name in ipairs({'pending', 'failing', 'delivered', 'gone', 'failed'}) do
  local index_key = index_prefix .. name
  if name == state then
    redis.call('ZADD', index_key, now, delivery_id)
  else
    redis.call('ZREM', index_key, delivery_id)
  end
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', now - retention)
end
return 1

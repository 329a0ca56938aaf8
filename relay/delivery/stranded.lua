-- Find stranded deliveries: filed as pending or failing for longer than the grace, still
-- pending, and with no arq job for the attempt they wait on (neither queued nor running).
-- Returns a flat list {delivery_id, attempt, callback_url, ...}.
local pending_key = KEYS[1]
local failing_key = KEYS[2]
local arq_queue_key = KEYS[3]
local job_prefix = ARGV[1]        -- 'relay:job:'
local arq_job_prefix = ARGV[2]    -- 'arq:job:'
local in_progress_prefix = ARGV[3]
local grace = tonumber(ARGV[4])
local batch = tonumber(ARGV[5])

local out = {}
for _, index_key in ipairs({pending_key, failing_key}) do
  local ids = redis.call('ZRANGEBYSCORE', index_key, '-inf', now - grace, 'LIMIT', 0, batch)
  for _, delivery_id in ipairs(ids) do
    local fields = redis.call('HMGET', job_prefix .. delivery_id, 'delivery', 'attempt',
                              'callback_url')
    if fields[1] == 'pending' and fields[3] and fields[3] ~= '' then
      local job_id = 'deliver:' .. delivery_id .. ':' .. fields[2]
      local queued = redis.call('EXISTS', arq_job_prefix .. job_id,
                                in_progress_prefix .. job_id) > 0
                     or redis.call('ZSCORE', arq_queue_key, job_id)
      if not queued then
        out[#out + 1] = delivery_id
        out[#out + 1] = fields[2]
        out[#out + 1] = fields[3]
      end
    end
  end
end
return out

-- Start tracking a job: its hash, its place in the poll queue and its reference_id index,
-- together or not at all. Returns 0 when the id is already tracked (nothing changes then).
-- Given the submission intent it settles (relay.jobs.intents), closes that intent in the same
-- step, tracked or already tracked: the job is then the record, and a tracking write that fails
-- leaves the intent for the reconcile.
local job_key = KEYS[1]
local polls_key = KEYS[2]
local ref_key = KEYS[3]        -- the job key again when there is no reference_id
local created_key = KEYS[4]
local intent_key = KEYS[5]     -- the job key again when there is no intent
local intents_key = KEYS[6]    -- the job key again when there is no intent
local intent_ref_key = KEYS[7] -- the job key again without an intent or a reference_id
local caller_jobs_key = KEYS[8] -- the job key again when the caller is unknown
local caller_ref_key = KEYS[9]  -- the job key again without a caller or a reference_id
local outstanding_key = KEYS[10] -- the caller's jobs not yet ended; the job key again without one
local request_id = ARGV[1]
local callback_url = ARGV[2]
local reference_id = ARGV[3]   -- '' when none
local first_poll_in = tonumber(ARGV[4])
local events = ARGV[5]         -- comma-separated event types; '' = the final ones
local metadata = ARGV[6]       -- JSON object echoed in callbacks; '' = none
local intent_id = ARGV[7]      -- '' when none
local trace = ARGV[8]          -- the submission's trace context (relay.tracing.spans); '' = none
local caller = ARGV[9]         -- the caller that submitted or watched it; '' when unknown
local index_ttl = tonumber(ARGV[10]) -- how long a caller's index keeps a job: its whole life

local created = redis.call('EXISTS', job_key) == 0
if created then
  -- The first write: under maxmemory a full Redis refuses it, and so the whole script (it only
  -- checks a script's first write), leaving the intent for the reconcile. One HSET for every
  -- field, the first event's sequence number (1) with them.
  local fields = {'created', now, 'interval', first_poll_in, 'callback_url', callback_url,
                  'reference_id', reference_id,
                  'timeline', string.format('submitted@%.3f', now), 'sequence', 1}
  if events ~= '' then table.insert(fields, 'events'); table.insert(fields, events) end
  if metadata ~= '' then table.insert(fields, 'metadata'); table.insert(fields, metadata) end
  if caller ~= '' then table.insert(fields, 'caller'); table.insert(fields, caller) end
  if trace ~= '' then table.insert(fields, 'trace'); table.insert(fields, trace) end
  redis.call('HSET', job_key, unpack(fields))
  -- Counted against its caller's max_outstanding until it ends (store.end.lua).
  if outstanding_key ~= job_key then redis.call('ZADD', outstanding_key, now, request_id) end
  redis.call('ZADD', polls_key, now + first_poll_in, request_id)
  redis.call('ZADD', created_key, now, request_id)
  if reference_id ~= '' then redis.call('SET', ref_key, request_id) end
  if caller ~= '' then
    -- The caller's own indexes: its list, and its reference_ids apart from other callers'.
    redis.call('ZADD', caller_jobs_key, now, request_id)
    redis.call('ZREMRANGEBYSCORE', caller_jobs_key, '-inf', now - index_ttl)
    redis.call('EXPIRE', caller_jobs_key, index_ttl)
    if reference_id ~= '' then
      redis.call('ZADD', caller_ref_key, now, request_id)
      redis.call('ZREMRANGEBYSCORE', caller_ref_key, '-inf', now - index_ttl)
      redis.call('EXPIRE', caller_ref_key, index_ttl)
    end
  end
  -- Its first event: the hash was just written, with no TTL yet (store.end.lua sets one).
  history_record(request_id, 1, caller, -1, '{"type":"status","status":"submitted"}', false,
                 false)
end
if intent_id ~= '' then
  redis.call('DEL', intent_key)
  redis.call('ZREM', intents_key, intent_id)
  if intent_ref_key ~= job_key then redis.call('ZREM', intent_ref_key, intent_id) end
end
if created then return 1 end
return 0

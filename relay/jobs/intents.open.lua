-- Write a submission's intent before its upstream create: what was asked, and when (Redis
-- clock). Indexed for the reconcile (due at now + first_look) and, with a reference_id, among
-- the open intents that could own an upstream job with it. An Idempotency-Key record this
-- request holds is marked as this intent's, so only this intent's outcome may settle it.
-- Returns the opening time.
local intent_key = KEYS[1]
local intents_key = KEYS[2]
local ref_key = KEYS[3]        -- the intent key again when there is no reference_id
local idem_key = KEYS[4]       -- the intent key again when there is no Idempotency-Key
local intent_id = ARGV[1]
local reference_id = ARGV[2]   -- '' when none
local idem = ARGV[3]           -- '' when none
local callback_url = ARGV[4]
local events = ARGV[5]
local metadata = ARGV[6]
local first_look = tonumber(ARGV[7]) -- RELAY_INTENT_FIRST_LOOK, or stale_after
local ttl = tonumber(ARGV[8])
local caller = ARGV[9]         -- whose submission it is ('' when unknown)

local started = string.format('%.6f', now)
redis.call('HSET', intent_key, 'started', started, 'reference_id', reference_id, 'idem', idem,
           'callback_url', callback_url, 'events', events, 'metadata', metadata, 'looks', 0,
           'caller', caller)
redis.call('EXPIRE', intent_key, ttl)
redis.call('ZADD', intents_key, now + first_look, intent_id)
if reference_id ~= '' then
  redis.call('ZADD', ref_key, now, intent_id)
  redis.call('EXPIRE', ref_key, ttl)
end
if idem ~= '' and redis.call('HGET', idem_key, 'state') == 'in_flight' then
  redis.call('HSET', idem_key, 'intent', intent_id)
  -- Held as long as the intent may be reconciled: a retry must not create a second job while
  -- the first one's outcome is unknown.
  redis.call('EXPIRE', idem_key, ttl)
end
return started

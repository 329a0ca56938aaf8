-- Leave an intent to the workers' reconcile: looked at from now + `after`, and (when it has
-- one) its Idempotency-Key held in flight for as long as the intent may still be settled, so a
-- retry with that key waits for the outcome instead of creating a second job.
-- Returns 0 when the intent is already gone (settled by someone else).
local intent_key = KEYS[1]
local intents_key = KEYS[2]
local idem_key = KEYS[3]       -- the intent key again when there is no Idempotency-Key
local intent_id = ARGV[1]
local after = tonumber(ARGV[2])
local hold = tonumber(ARGV[3])  -- seconds the key stays held

if redis.call('EXISTS', intent_key) == 0 then return 0 end
redis.call('ZADD', intents_key, 'XX', now + after, intent_id)
if idem_key ~= intent_key and redis.call('HGET', idem_key, 'intent') == intent_id
   and redis.call('HGET', idem_key, 'state') == 'in_flight' then
  redis.call('EXPIRE', idem_key, math.max(1, math.ceil(hold)))
end
return 1

-- Close an intent the reconcile settled, and give its Idempotency-Key (if this intent still
-- holds it in flight) its final answer: the answer fields relay.api.idempotency keeps, or no
-- record at all (status 0: released, so a retry may create the job).
local intent_key = KEYS[1]
local intents_key = KEYS[2]
local ref_key = KEYS[3]        -- the intent key again when there is no reference_id
local idem_key = KEYS[4]       -- the intent key again when there is no Idempotency-Key
local intent_id = ARGV[1]
local status = tonumber(ARGV[2])
local body = ARGV[3]
local keep = tonumber(ARGV[4])

redis.call('ZREM', intents_key, intent_id)
if ref_key ~= intent_key then redis.call('ZREM', ref_key, intent_id) end
if idem_key ~= intent_key and redis.call('HGET', idem_key, 'intent') == intent_id
   and redis.call('HGET', idem_key, 'state') == 'in_flight' then
  if status == 0 then
    redis.call('DEL', idem_key)
  else
    redis.call('HSET', idem_key, 'state', 'done', 'status', status,
               'content_type', 'application/json', 'body', body)
    redis.call('EXPIRE', idem_key, keep)
  end
end
redis.call('DEL', intent_key)
return 1

-- Claim an Idempotency-Key for one request, or say what it already holds.
-- Returns {'new'} when this request may proceed (the key now holds it in flight), else
-- {'conflict'} (another body), {'in_flight'}, or {'done', status, content_type, body}.
local key = KEYS[1]
local fingerprint = ARGV[1]
local in_flight_ttl = tonumber(ARGV[2])

local held = redis.call('HMGET', key, 'state', 'fingerprint', 'status', 'content_type', 'body')
if not held[1] then
  redis.call('HSET', key, 'state', 'in_flight', 'fingerprint', fingerprint)
  redis.call('EXPIRE', key, in_flight_ttl)
  return {'new'}
end
if held[2] ~= fingerprint then return {'conflict'} end
if held[1] == 'in_flight' then return {'in_flight'} end
return {'done', held[3], held[4], held[5]}

-- Claim an Idempotency-Key for one request, or say what it already holds.
-- Returns {'new'} when this request may proceed (the key now holds it in flight), else
-- {'conflict'} (another body), {'in_flight'}, {'done', status, content_type, body}, or
-- {'full', seconds} when the caller already holds `limit` keys (seconds: until its oldest
-- stops counting).
-- Each key a caller claims is counted in the caller's sorted set (member: the record's key,
-- score: the Redis-clock time it stops counting, which is never before the record expires),
-- so however many new keys a caller sends, it holds at most `limit` records.
local key = KEYS[1]
local held_key = KEYS[2]       -- the caller's count of held keys
local fingerprint = ARGV[1]
local in_flight_ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local counted_for = tonumber(ARGV[4])

local held = redis.call('HMGET', key, 'state', 'fingerprint', 'status', 'content_type', 'body')
if not held[1] then
  redis.call('ZREMRANGEBYSCORE', held_key, '-inf', now)
  if redis.call('ZCARD', held_key) >= limit then
    local oldest = redis.call('ZRANGE', held_key, 0, 0, 'WITHSCORES')
    return {'full', math.ceil(tonumber(oldest[2]) - now)}
  end
  redis.call('HSET', key, 'state', 'in_flight', 'fingerprint', fingerprint)
  redis.call('EXPIRE', key, in_flight_ttl)
  redis.call('ZADD', held_key, now + counted_for, key)
  redis.call('EXPIRE', held_key, counted_for)
  return {'new'}
end
if held[2] ~= fingerprint then return {'conflict'} end
if held[1] == 'in_flight' then return {'in_flight'} end
return {'done', held[3], held[4], held[5]}

-- Keep (ms > 0: expire in ms) or drop (ms = 0) the sweep lease, only while `token` holds it.
-- Returns 1 when the caller held it, 0 when it had expired or another worker holds it.
local lease_key = KEYS[1]
local token = ARGV[1]
local ms = tonumber(ARGV[2])

if redis.call('GET', lease_key) ~= token then return 0 end
if ms > 0 then
  redis.call('PEXPIRE', lease_key, ms)
else
  redis.call('DEL', lease_key)
end
return 1

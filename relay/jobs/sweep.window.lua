-- Where a sweep's window of the list starts: the oldest outstanding job tracked within the last
-- `window` seconds. Entries for jobs no longer in the poll queue are dropped on the way (the
-- queue is the one record of who is outstanding; this index only dates them), as are entries
-- older than any job may live. Returns {outstanding count, oldest created or '', now}.
local created_key = KEYS[1]
local polls_key = KEYS[2]
local window = tonumber(ARGV[1])
local max_age = tonumber(ARGV[2])

redis.call('ZREMRANGEBYSCORE', created_key, '-inf', '(' .. string.format('%.17g', now - max_age - 86400))
local outstanding = redis.call('ZCARD', polls_key)
local oldest = ''
for _ = 1, 10 do
  local head = redis.call('ZRANGEBYSCORE', created_key, now - window, '+inf', 'WITHSCORES', 'LIMIT', 0, 100)
  if #head == 0 then break end
  for i = 1, #head, 2 do
    if redis.call('ZSCORE', polls_key, head[i]) then
      oldest = head[i + 1]
      break
    end
    redis.call('ZREM', created_key, head[i])
  end
  if oldest ~= '' then break end
end
return {outstanding, oldest, string.format('%.17g', now)}

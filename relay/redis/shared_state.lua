-- The shared gauges in one round trip: outstanding jobs, due polls, poll lag, queued and due
-- deliveries, destinations backed off now, how overdue the most overdue queued delivery is,
-- the age of the oldest delivery waiting for its first attempt, the upstream pause left, and
-- workers whose heartbeat is current. arq scores its queue in milliseconds.
local polls_key = KEYS[1]
local arq_queue_key = KEYS[2]
local backed_off_key = KEYS[3]
local pending_key = KEYS[4]       -- the delivery state index's pending set
local paused_key = KEYS[5]
local workers_key = KEYS[6]       -- worker -> Redis-clock time its heartbeat lasts until

-- How far the set's lowest score (seconds times `scale`) is behind now; 0 for an empty set
-- or a score still ahead.
local function behind(key, scale)
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #head == 0 then return 0 end
  return math.max(0, now - tonumber(head[2]) / scale)
end

local paused = tonumber(redis.call('GET', paused_key) or '0')
return {redis.call('ZCARD', polls_key), redis.call('ZCOUNT', polls_key, '-inf', now),
        tostring(behind(polls_key, 1)), redis.call('ZCARD', arq_queue_key),
        redis.call('ZCOUNT', arq_queue_key, '-inf', math.floor(now * 1000)),
        redis.call('ZCOUNT', backed_off_key, '(' .. now, '+inf'),
        tostring(behind(arq_queue_key, 1000)), tostring(behind(pending_key, 1)),
        tostring(math.max(0, paused - now)),
        redis.call('ZCOUNT', workers_key, '(' .. now, '+inf')}

-- The shared gauges in one round trip: outstanding jobs, due polls, poll lag, queued and due
-- deliveries, destinations backed off now. arq scores its queue in milliseconds.
local polls_key = KEYS[1]
local arq_queue_key = KEYS[2]
local backed_off_key = KEYS[3]

local head = redis.call('ZRANGE', polls_key, 0, 0, 'WITHSCORES')
local lag = 0
if #head > 0 and tonumber(head[2]) < now then lag = now - tonumber(head[2]) end
return {redis.call('ZCARD', polls_key), redis.call('ZCOUNT', polls_key, '-inf', now),
        tostring(lag), redis.call('ZCARD', arq_queue_key),
        redis.call('ZCOUNT', arq_queue_key, '-inf', math.floor(now * 1000)),
        redis.call('ZCOUNT', backed_off_key, '(' .. now, '+inf')}

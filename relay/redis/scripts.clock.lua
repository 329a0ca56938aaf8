-- Prepended to every relay script (relay.redis.scripts): the one clock for every decision
-- about a job, Redis's own, so workers whose clocks disagree still agree on what is due and what expired.
local redis_time = redis.call('TIME')
local now = tonumber(redis_time[1]) + tonumber(redis_time[2]) / 1000000

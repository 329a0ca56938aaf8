-- Make claimed ids due now (a worker draining for shutdown gives its polls to the others).
local polls_key = KEYS[1]
for i = 1, #ARGV do redis.call('ZADD', polls_key, 'XX', now, ARGV[i]) end
return #ARGV

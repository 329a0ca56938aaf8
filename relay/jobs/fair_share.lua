-- The API's bookings of the upstream budget's shared part (the GCRA of schedule.claim.lua and
-- schedule.reserve.lua), shared fairly among callers: start-time fair queueing (SFQ).
--
-- Slots are booked at most `lookahead` seconds ahead. A call that finds the next slot that
-- close and nobody waiting books it at once; otherwise it waits as a ticket in the queue,
-- scored by its start tag: max(the virtual time, its caller's last finish tag), the caller's
-- finish tag then moving on by 1/share. Whenever this script runs, the queue's head tickets are
-- granted the slots that come within the lookahead, and the virtual time becomes the start tag
-- of the last one granted. So a caller that waits little (tags near the virtual time) goes
-- ahead of one with a long queue, callers get slots in proportion to their shares while they
-- all wait, and a caller alone gets every slot (an idle caller's tags do not run ahead).
--
-- op 'admit': the caller's limits first (nothing is booked or counted for a refused call),
-- then a slot. op 'wait': a waiting ticket looks again (or gives up).
-- Returns {1, seconds until the slot} once booked; {2, ticket, seconds until it is worth
-- looking again} while waiting; {0, seconds to retry after, why} when refused: 'budget' (no
-- slot within max_wait, or the ticket gave up), 'submit_rate' or 'max_outstanding'.
local tat_key = KEYS[1]          -- the budget's shared part
local paused_key = KEYS[2]
local queue_key = KEYS[3]        -- ticket -> start tag
local granted_key = KEYS[4]      -- ticket -> the time of the slot it was granted
local tags_key = KEYS[5]         -- 'v': virtual time; 'f:<caller>': finish tag; 'seq'
local rate_key = KEYS[6]         -- the caller's submit_rate GCRA (admit only)
local outstanding_key = KEYS[7]  -- the caller's outstanding jobs (admit only)
local op = ARGV[1]
local period = tonumber(ARGV[2])     -- the shared part's emission interval (s per call)
local burst = tonumber(ARGV[3])
local lookahead = tonumber(ARGV[4])
local caller = ARGV[5]                    -- admit: whose call it is
local share = tonumber(ARGV[6])           -- admit: its share (> 0)
local max_wait = tonumber(ARGV[7])        -- admit: the longest expected wait taken
local submit_rate = tonumber(ARGV[8])     -- admit: the caller's submit_rate; 0: none
local max_outstanding = tonumber(ARGV[9]) -- admit: the caller's max_outstanding; 0: none
local ticket = ARGV[10]                   -- wait: the ticket
local give_up = ARGV[11] == '1'           -- wait: leave the queue unless granted

local function fmt(x) return string.format('%.17g', x) end

-- When the shared part's next slot comes (as schedule.take did: a 429 pause's end first).
local function next_slot()
  local found = redis.call('MGET', paused_key, tat_key)
  local start = math.max(now, tonumber(found[1] or '0'))
  local tat = tonumber(found[2] or '0')
  if tat < start then tat = start end
  return math.max(start, tat + period - burst * period), tat
end

local function book(tat)
  tat = tat + period
  redis.call('SET', tat_key, fmt(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end

-- A ticket is '<sequence>|<deadline>': equal tags go first come, first served, and a ticket
-- past its deadline (its waiter gave up or died) is dropped rather than granted.
local function deadline_of(ticket)
  return tonumber(string.match(ticket, '|(.+)$'))
end

-- Returns true when it left the queue empty.
local function dispatch()
  while true do
    local head = redis.call('ZRANGE', queue_key, 0, 0, 'WITHSCORES')
    if #head == 0 then return true end
    local at, tat = next_slot()
    if at - now > lookahead then return false end
    redis.call('ZREM', queue_key, head[1])
    if deadline_of(head[1]) >= now then
      book(tat)
      redis.call('ZADD', granted_key, at, head[1])
      redis.call('HSET', tags_key, 'v', head[2])
    end
  end
end

-- A waiting ticket's expected wait: the next slot, then one for each ticket ahead of it.
local function expected(ahead)
  local at = next_slot()
  return at - now + ahead * period
end

local function granted(ticket)
  local at = redis.call('ZSCORE', granted_key, ticket)
  if not at then return nil end
  redis.call('ZREM', granted_key, ticket)
  return {1, fmt(math.max(0, tonumber(at) - now))}
end

local function waiting(ticket)
  local ahead = redis.call('ZRANK', queue_key, ticket)
  -- Looked at again once its slot may be within the lookahead: not every slot.
  local again = math.max(0.01, expected(ahead) - lookahead / 2)
  return {2, ticket, fmt(again)}
end

local keep_ms = 3600000
local emptied = dispatch()
-- Grants nobody came for (their waiter died after the deadline check) are forgotten.
redis.call('ZREMRANGEBYSCORE', granted_key, '-inf', now - 60)

if op == 'wait' then
  local found = granted(ticket)
  if found then return found end
  if redis.call('ZSCORE', queue_key, ticket) == false then
    return {0, fmt(lookahead), 'budget'}  -- dropped past its deadline
  end
  if give_up then
    redis.call('ZREM', queue_key, ticket)
    return {0, fmt(expected(redis.call('ZCARD', queue_key))), 'budget'}
  end
  return waiting(ticket)
end

if max_outstanding > 0 and redis.call('ZCARD', outstanding_key) >= max_outstanding then
  return {0, '0', 'max_outstanding'}
end
local rate_tat, rate_period
if submit_rate > 0 then
  rate_period = 1 / submit_rate
  local rate_burst = math.max(1, math.floor(submit_rate))
  rate_tat = math.max(now, tonumber(redis.call('GET', rate_key) or '0'))
  local allowed_at = rate_tat + rate_period - rate_burst * rate_period
  -- The epsilon: a thousandth of a call, against float rounding at ~1.8e9 s (see claim).
  if allowed_at > now + rate_period * 1e-3 then
    return {0, fmt(allowed_at - now), 'submit_rate'}
  end
end

local tags = redis.call('HMGET', tags_key, 'v', 'f:' .. caller)
local start_tag = math.max(tonumber(tags[1] or '0'), tonumber(tags[2] or '0'))
local at, tat = next_slot()
local reply
-- Nothing can have joined the queue since dispatch() found it empty: this script is atomic.
if emptied and at - now <= lookahead then
  book(tat)
  -- The virtual time moves to this call's tag, and the caller's finish tag on by 1/share.
  redis.call('HSET', tags_key, 'v', fmt(start_tag), 'f:' .. caller, fmt(start_tag + 1 / share))
  reply = {1, fmt(at - now)}
else
  -- Tickets with an equal tag came first: they are ahead too.
  local ahead = redis.call('ZCOUNT', queue_key, '-inf', fmt(start_tag))
  local wait = at - now + ahead * period
  if wait > max_wait then return {0, fmt(wait), 'budget'} end
  local seq = redis.call('HINCRBY', tags_key, 'seq', 1)
  -- Its waiter gives up at max_wait; the lookahead is room for the last look.
  local mine = string.format('%015d|%.3f', seq, now + max_wait + lookahead)
  redis.call('ZADD', queue_key, fmt(start_tag), mine)
  -- Gone once no ticket in it can be live: while it is there, status reads leave the shared
  -- part to the waiters (schedule.claim.lua, schedule.reserve.lua).
  redis.call('PEXPIRE', queue_key, math.ceil((max_wait + lookahead) * 1000) + 1000)
  redis.call('PEXPIRE', granted_key, keep_ms)
  dispatch()
  reply = granted(mine) or waiting(mine)
  redis.call('HSET', tags_key, 'f:' .. caller, fmt(start_tag + 1 / share))
end
redis.call('PEXPIRE', tags_key, 24 * keep_ms)
if submit_rate > 0 then
  rate_tat = rate_tat + rate_period
  redis.call('SET', rate_key, fmt(rate_tat), 'PX', math.ceil((rate_tat - now) * 1000) + 1000)
end
return reply

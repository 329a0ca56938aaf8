-- Append one entry to a delivery's attempt log and file the delivery under its state.
-- The log lives as long as the job (same TTL) and each entry gets the Redis-clock time. Past
-- `max_entries` it keeps its first `keep_first` entries (the delivery's real first attempts),
-- then one entry counting those left out (`dropped`), then the newest: a flood of redeliveries
-- never pushes out what happened first. The state index holds every delivery once, in the set of its
-- current state, scored by when it got there; entries older than `retention` are dropped.
-- A postponement (`postponed_attempt` set) is logged only while the delivery still waits on
-- that attempt, with the state it is in and when it is tried next; it leaves the state index
-- alone (nothing changed), and a postponement again of the same attempt updates its entry
-- (`postponed` counts them) rather than adding one, so a long outage does not fill the log.
local job_key = KEYS[1]
local log_key = KEYS[2]
local index_prefix = ARGV[1]   -- 'relay:deliveries:'
local delivery_id = ARGV[2]
local entry = ARGV[3]          -- JSON object without its time: '{...}'
local max_entries = tonumber(ARGV[4])
local retention = tonumber(ARGV[5])
local keep_first = tonumber(ARGV[6])
local postponed_attempt = ARGV[7] or ''   -- '' unless this entry is a postponement of that attempt
local next_in = tonumber(ARGV[8] or '0')   -- a postponement's wait, in seconds

local LEFT_OUT = '__left_out__'
local function trim()
  while redis.call('LLEN', log_key) > max_entries do
    local at_mark = redis.call('LINDEX', log_key, keep_first)
    local mark = cjson.decode(at_mark)
    local dropped = 1
    if mark['dropped'] then
      -- The count is there already: the oldest entry after it goes, and is counted.
      local gone = cjson.decode(redis.call('LINDEX', log_key, keep_first + 1))
      redis.call('LSET', log_key, keep_first + 1, LEFT_OUT)
      redis.call('LREM', log_key, 1, LEFT_OUT)
      dropped = mark['dropped'] + 1
      mark = gone
    end
    -- (The first time, the entry where the count goes is the one left out.)
    local count = {at = mark['at'], dropped = dropped,
                   note = dropped .. ' entries left out: the log keeps its first ' .. keep_first
                          .. ' and its newest'}
    redis.call('LSET', log_key, keep_first, cjson.encode(count))
  end
end

local delivery = redis.call('HGET', job_key, 'delivery')
if not delivery then return 0 end
-- Pending after a failed attempt is failing; pending at the (re)start of the schedule is not.
local attempt = tonumber(redis.call('HGET', job_key, 'attempt') or '0')
local base = tonumber(redis.call('HGET', job_key, 'schedule_base') or '0')
local state = delivery
if delivery == 'pending' and attempt > base then state = 'failing' end

local ttl = redis.call('TTL', job_key)
if postponed_attempt ~= '' then
  if delivery ~= 'pending' or attempt ~= tonumber(postponed_attempt) then return 0 end
  local fields = cjson.decode(entry)
  fields['at'] = now
  fields['state'] = state
  fields['next_at'] = now + next_in
  fields['postponed'] = 1
  local last = redis.call('LINDEX', log_key, -1)
  if last then
    local previous = cjson.decode(last)
    if previous['postponed'] and previous['attempt'] == attempt then
      fields['postponed'] = previous['postponed'] + 1
      redis.call('LSET', log_key, -1, cjson.encode(fields))
      return 1
    end
  end
  redis.call('RPUSH', log_key, cjson.encode(fields))
  trim()
  if ttl > 0 then redis.call('EXPIRE', log_key, ttl) end
  return 1
end

local stamped = '{"at":' .. string.format('%.6f', now) .. ',' .. string.sub(entry, 2)
redis.call('RPUSH', log_key, stamped)
trim()
if ttl > 0 then redis.call('EXPIRE', log_key, ttl) end

for _, name in ipairs({'pending', 'failing', 'delivered', 'gone', 'failed'}) do
  local index_key = index_prefix .. name
  if name == state then
    redis.call('ZADD', index_key, now, delivery_id)
  else
    redis.call('ZREM', index_key, delivery_id)
  end
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', now - retention)
end
return 1

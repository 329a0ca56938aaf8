-- The relay's epoch marker: written once into a Redis that has none, checked by every process.
-- A process that saw one marker and now finds none, or another, knows Redis lost its data
-- (restarted without persistence, flushed, failed over to an empty replica) and records the
-- loss, which stays until an operator acknowledges it. And a small write that proves Redis takes
-- writes: full under noeviction (or a read-only replica, a failed snapshot with
-- stop-writes-on-bgsave-error), Redis still answers reads and refuses every write.
-- Returns {epoch, loss record or '', why writes are refused or ''}.
local epoch_key = KEYS[1]
local lost_key = KEYS[2]
local probe_key = KEYS[3]
local known = ARGV[1]          -- the marker this process saw last; '' before its first check
local fresh = ARGV[2]          -- the marker to write when there is none

local written = redis.pcall('SET', probe_key, '1', 'PX', 60000)
local refused = type(written) == 'table' and written.err or ''
local current = redis.call('GET', epoch_key)
local marker = current
if not current and refused == '' then
  redis.call('SET', epoch_key, fresh)
  marker = fresh
end
if known ~= '' and current ~= known then
  local found = current and ('another marker, ' .. current) or 'no marker'
  local record = string.format('Redis lost the relay\'s data: epoch %s was expected, %s was found ' ..
                               '(Redis clock %d)', known, found, math.floor(now))
  redis.pcall('SET', lost_key, record, 'NX')
end
-- No marker and no way to write one: what this process knew stays what it knows.
return {marker or known, redis.call('GET', lost_key) or '', refused}

-- The relay's epoch marker: written once into a Redis that has none, checked by every process.
-- A process that saw one marker and now finds none, or another, knows Redis lost its data
-- (restarted without persistence, flushed, failed over to an empty replica) and records the
-- loss, which stays until an operator acknowledges it. Returns {epoch, loss record or ''}.
local epoch_key = KEYS[1]
local lost_key = KEYS[2]
local known = ARGV[1]          -- the marker this process saw last; '' before its first check
local fresh = ARGV[2]          -- the marker to write when there is none

local current = redis.call('GET', epoch_key)
if not current then
  redis.call('SET', epoch_key, fresh)
end
if known ~= '' and current ~= known then
  local found = current and ('another marker, ' .. current) or 'no marker'
  local record = string.format('Redis lost the relay\'s data: epoch %s was expected, %s was found ' ..
                               '(Redis clock %d)', known, found, math.floor(now))
  redis.call('SET', lost_key, record, 'NX')
end
return {current or fresh, redis.call('GET', lost_key) or ''}

-- A job's events, shared by every script that emits one (prepended after the clock, below the
-- header relay.jobs.history writes: history_prefix, feed_prefix, events_channel and
-- feed_retention). Each event gets the job's next sequence number (the `sequence` field of its
-- hash), is appended to the job's history (a list living as long as the job's hash), filed in
-- its caller's feed as a pointer (request id, sequence), and announced on the events channel,
-- which wakes the API's waiters. `fields` is the event's own part as a JSON object text
-- ('{"type":"status",...}'); the sequence and the time go in front of it. What readers know
-- is not stored again (relay.jobs.history puts it back): the request id (the list's key), and
-- the job's final body, which an event marked `"with_body":true` carries as `data`.
-- `ends`: the job ended with this event; `last`: nothing more is to come (nothing left to
-- deliver). Returns the sequence number, or 0 when the job's hash is gone (nothing written).
-- `history_record` is its second half, for a script that has just written the job's hash and so
-- knows what history_append reads of it: the sequence number (already in the hash), the job's
-- caller ('' when none) and its hash's TTL in seconds (<= 0: none).
local function history_record(request_id, sequence, caller, ttl, fields, ends, last)
  local head = string.format('{"sequence":%d,"at":%.3f', sequence, now)
  if last then head = head .. ',"last":true' end
  local history_key = history_prefix .. request_id
  redis.call('RPUSH', history_key, head .. ',' .. string.sub(fields, 2))
  if ttl > 0 then redis.call('EXPIRE', history_key, ttl) end
  if caller ~= '' then
    -- Trimmed by age as it grows, so a feed nobody reads holds only what jobs still hold.
    local horizon = string.format('%d', math.floor((now - feed_retention) * 1000))
    redis.call('XADD', feed_prefix .. caller, 'MINID', '~', horizon, '*',
               'r', request_id, 's', sequence)
  end
  local flags = 0
  if ends then flags = flags + 1 end
  if last then flags = flags + 2 end
  redis.call('PUBLISH', events_channel, cjson.encode({request_id, caller, sequence, flags}))
  return sequence
end

local function history_append(job_key, request_id, fields, ends, last)
  if redis.call('EXISTS', job_key) == 0 then return 0 end
  local sequence = redis.call('HINCRBY', job_key, 'sequence', 1)
  local caller = redis.call('HGET', job_key, 'caller') or ''
  return history_record(request_id, sequence, caller, redis.call('TTL', job_key), fields, ends,
                        last)
end

-- A callback body stamped with the sequence number of the event it carries, first of its
-- fields (the body's end, where its data may be cut off for storage, stays as it was).
local function history_stamp(event, sequence)
  if event == '{}' then return '{"sequence":' .. sequence .. '}' end
  return '{"sequence":' .. sequence .. ',' .. string.sub(event, 2)
end

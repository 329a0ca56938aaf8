"""Which polls are due, and who may make them: the poll schedule and the shared upstream budget.

All outstanding jobs sit in one sorted set scored by when they are next due, so finding due work
is a range read of the head (O(log N + k)), never a scan. A claim and the rate budget are one
atomic script: it takes at most as many due ids as the budget allows right now, and pushes each
claimed id a lease into the future. A worker that finishes sets the real next time; a worker that
dies does nothing, and its claims fall due again when the lease runs out.

The budget is a GCRA (generic cell rate algorithm) over one Redis key, shared by every worker:
requests are spaced 1/rate apart on average with a burst of at most `burst`. An upstream 429
sets a pause that every worker honours before claiming anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

from relay import redis_keys

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: polls, tat, paused  ARGV: max ids, lease, emission interval (s), burst
# Returns {claimed count, wait hint seconds (string), ids...}; wait -1 means nothing is tracked.
_CLAIM = (
    _NOW
    + """
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused > now then return {0, tostring(paused - now)} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #ids == 0 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #head == 0 then return {0, '-1'} end
  return {0, tostring(tonumber(head[2]) - now)}
end
local period = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat < now then tat = now end
-- Differences first: at ~1.8e9 s a double resolves ~0.2 us, so (now + x - tat) loses x's
-- precision; the epsilon (a thousandth of a request) absorbs what remains.
local allowed = math.floor((now - tat) / period + burst + 1e-3)
if allowed < 1 then return {0, tostring(tat + period - burst * period - now)} end
local n = math.min(allowed, #ids)
tat = tat + n * period
-- %.17g: tostring keeps 14 digits, ~0.1 ms at this magnitude, too coarse at high rates.
redis.call('SET', KEYS[2], string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
local lease_until = now + tonumber(ARGV[2])
local out = {n, '0'}
for i = 1, n do
  redis.call('ZADD', KEYS[1], lease_until, ids[i])
  out[#out + 1] = ids[i]
end
return out
"""
)

# KEYS: paused  ARGV: seconds. Only ever extends a pause.
_PAUSE = (
    _NOW
    + """
local until_ = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  local ttl = math.ceil(tonumber(ARGV[1]) * 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.17g', until_), 'PX', ttl)
end
return 1
"""
)

# KEYS: polls  ARGV: ids. Makes claimed ids due now (a worker draining for shutdown).
_HAND_BACK = (
    _NOW
    + """
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i]) end
return #ARGV
"""
)


@dataclass(frozen=True)
class Claim:
    ids: list[str]
    # How long until claiming could give more: the budget's next slot, the end of a pause or the
    # next due poll. None: nothing is tracked at all.
    wait: float | None


class PollSchedule:
    def __init__(self, redis: Redis, *, rate: float, lease: float) -> None:
        self.redis = redis
        self.period = 1.0 / rate
        # A burst of a tenth of a second's worth keeps spacing even yet lets one claim take several.
        self.burst = max(1, math.floor(rate / 10))
        self.lease = lease
        self._claim = redis.register_script(_CLAIM)
        self._pause = redis.register_script(_PAUSE)
        self._hand_back = redis.register_script(_HAND_BACK)

    async def claim(self, limit: int) -> Claim:
        reply = await self._claim(
            keys=[redis_keys.POLLS, redis_keys.UPSTREAM_TAT, redis_keys.UPSTREAM_PAUSED],
            args=[limit, self.lease, self.period, self.burst],
        )
        count, wait = int(reply[0]), float(reply[1])
        ids = [raw.decode() for raw in reply[2 : 2 + count]]
        return Claim(ids=ids, wait=None if wait < 0 else max(wait, 0.0))

    async def pause_upstream(self, seconds: float) -> None:
        await self._pause(keys=[redis_keys.UPSTREAM_PAUSED], args=[seconds])

    async def hand_back(self, request_ids: list[str]) -> None:
        if request_ids:
            await self._hand_back(keys=[redis_keys.POLLS], args=request_ids)

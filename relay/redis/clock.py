"""The one clock, read from Python: Redis TIME, without a round trip per reading.

Every decision about a job's fate is made on Redis's clock: scripts read it themselves
(scripts.clock.lua), readers get it with the record (`Job.read_at`). Some comparisons happen in
Python instead, the main one inside arq, whose worker picks the deliveries that are due by
comparing `arq:queue` scores with its own `timestamp_ms()` (relay.worker.process points that at
this clock). A worker whose own clock is minutes off would otherwise make a deferred attempt at
once, or minutes late. Callbacks' `webhook-timestamp` comes from it too: receivers refuse one
more than 5 minutes off their own clock.

The estimate is a Redis TIME sample carried forward on the local monotonic clock, not an offset
added to the local wall clock: a wall clock stepped between samples (NTP, a resumed VM) does
not move it. It is sampled again every REFRESH seconds, so drift and a change of Redis server
(a failover to a host whose clock differs) are picked up.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from relay.lifecycle import Service, repeat
from relay.redis.batch import batcher

log = logging.getLogger(__name__)

REFRESH = 10.0
# A sample's error is up to half its round trip: one slower than this (a stalled Redis) is not
# taken once there is a better one.
MAX_ROUND_TRIP = 0.2


class RedisClock(Service):
    name = "redis-clock"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._redis_at: float | None = None  # Redis TIME at the sample...
        self._monotonic_at = 0.0  # ...and the local monotonic clock then

    async def sync(self) -> None:
        """Sample Redis TIME; raises RedisError when Redis cannot be asked."""
        before = time.monotonic()
        # Straight on a connection of its own, not through the batcher: the sample times its
        # own round trip, which waiting behind another batch would stretch.
        seconds, micros = await self.redis.time()
        after = time.monotonic()
        if self._redis_at is not None and after - before > MAX_ROUND_TRIP:
            log.debug("clock sample skipped: a %.3f s round trip", after - before)
            return
        self._redis_at = seconds + micros / 1e6
        self._monotonic_at = (before + after) / 2

    def now(self) -> float:
        """Seconds since the epoch on Redis's clock."""
        if self._redis_at is None:
            raise RuntimeError("RedisClock.now() before its first sync()")
        return self._redis_at + (time.monotonic() - self._monotonic_at)

    def now_ms(self) -> int:
        """Milliseconds since the epoch on Redis's clock, as arq scores its queue."""
        return int(self.now() * 1000)

    async def run(self, stop: asyncio.Event) -> None:
        """Sample again every REFRESH seconds until `stop`; a failed sample keeps the last."""
        await repeat(self.sync, every=REFRESH, first_after=REFRESH, stop=stop, what="clock sample")


async def redis_now(redis: Redis) -> float:
    """Redis's clock read once (a round trip), in seconds since the epoch: for a process that
    keeps no RedisClock (the API), or a reading that must be Redis's own."""
    ((seconds, micros),) = await batcher(redis).run([("TIME",)])
    return float(seconds + micros / 1e6)

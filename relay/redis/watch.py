"""Watching the shared Redis for what loses jobs quietly: coming back empty, and filling up.

An empty Redis looks like a healthy one with no work, so every process remembers the epoch
marker (`relay:epoch`) it saw, and checks it every few seconds and on each readiness probe. When
the marker is gone or replaced (a restart without persistence, FLUSHALL, a failover to an empty
replica), the first process to notice records the loss in `relay:data-lost`; from then on every
process logs an error, reports `relay_redis_data_lost` 1 and fails its readiness, until an
operator acknowledges it (`relay ack-data-loss`, or deleting that key). A loss nobody saw
happen (every process restarted along with Redis) cannot be told from a first start.

Memory: Redis under `noeviction` refuses writes when full, so every check compares used_memory
with maxmemory and logs a warning above MEMORY_WARNING (the metrics report the same figures).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from relay.lifecycle import Service, repeat
from relay.metrics import REDIS_DATA_LOST, read_memory
from relay.redis import keys, scripts

log = logging.getLogger(__name__)

CHECK_INTERVAL = 10.0
# The share of maxmemory above which every check logs a warning.
MEMORY_WARNING = 0.8


class RedisWatch(Service):
    name = "redis-watch"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.epoch = ""
        # The loss record while one is unacknowledged, else None.
        self.data_lost: str | None = None
        self._check = scripts.register(redis, __name__, "epoch")

    async def check(self) -> None:
        """Check the epoch marker and memory once; raises RedisError when Redis is unreachable."""
        reply = await self._check(
            keys=[keys.EPOCH, keys.DATA_LOST], args=[self.epoch, uuid.uuid4().hex]
        )
        self.epoch = reply[0].decode()
        lost = reply[1].decode() or None
        if lost and lost != self.data_lost:
            log.error(
                "%s. Jobs outstanding and deliveries queued then are gone; their callers get no "
                "callback. Acknowledge with `relay ack-data-loss` once explained.",
                lost,
            )
        elif self.data_lost and not lost:
            log.warning("the Redis data loss was acknowledged")
        self.data_lost = lost
        REDIS_DATA_LOST.set(1 if lost else 0)
        used, maximum = await read_memory(self.redis)
        if maximum and used > maximum * MEMORY_WARNING:
            log.warning(
                "Redis memory is %.0f %% full (%d of %d bytes): when full, new jobs are refused",
                100 * used / maximum,
                used,
                maximum,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Check every CHECK_INTERVAL seconds until `stop` is set."""
        await repeat(self.check, every=CHECK_INTERVAL, stop=stop, what="Redis check")


async def readiness(watch: RedisWatch) -> JSONResponse:
    """/readyz for every process: Redis reachable and no unacknowledged loss of its data."""
    try:
        await watch.check()
    except RedisError:
        return JSONResponse({"status": "unavailable", "error": "redis unreachable"}, 503)
    if watch.data_lost:
        return JSONResponse({"status": "data lost", "error": watch.data_lost}, 503)
    return JSONResponse({"status": "ok"})


async def acknowledge(redis: Redis) -> str | None:
    """Clear a recorded data loss; returns the record that was cleared, if any."""
    record = await redis.getdel(keys.DATA_LOST)
    return record.decode() if record else None

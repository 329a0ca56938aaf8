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
And every check makes a small write: while Redis refuses it (full, a read-only replica, a failed
snapshot with stop-writes-on-bgsave-error) it still answers reads, yet no job can be submitted
or recorded, so readiness fails and `relay_redis_writable` is 0.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from relay.lifecycle import Service, repeat
from relay.metrics import REDIS_DATA_LOST, REDIS_WRITABLE
from relay.redis import keys, scripts
from relay.redis.batch import batcher
from relay.redis.shared_state import read_memory

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
        # Why Redis refused the last check's write (its error), else None.
        self.writes_refused: str | None = None
        self._check = scripts.register(redis, __name__, "epoch")

    async def check(self) -> None:
        """Check the epoch marker and memory once; raises RedisError when Redis is unreachable."""
        try:
            reply = await self._check(
                keys=[keys.EPOCH, keys.DATA_LOST, keys.READY_WRITE_CHECK],
                args=[self.epoch, uuid.uuid4().hex],
            )
        except RedisError:
            REDIS_WRITABLE.set(0)  # unreachable takes no writes either
            raise
        self.epoch = reply[0].decode()
        lost = reply[1].decode() or None
        refused = reply[2].decode() or None
        if refused and not self.writes_refused:
            log.error("Redis refuses writes: %s. No job can be submitted or recorded.", refused)
        elif self.writes_refused and not refused:
            log.warning("Redis takes writes again")
        self.writes_refused = refused
        REDIS_WRITABLE.set(0 if refused else 1)
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
    """/readyz for every process: Redis reachable, taking writes, and no unacknowledged loss of
    its data."""
    try:
        await watch.check()
    except RedisError:
        return JSONResponse({"status": "unavailable", "error": "redis unreachable"}, 503)
    if watch.writes_refused:
        return JSONResponse(
            {"status": "unavailable", "error": f"redis refuses writes: {watch.writes_refused}"},
            503,
        )
    if watch.data_lost:
        return JSONResponse({"status": "data lost", "error": watch.data_lost}, 503)
    return JSONResponse({"status": "ok"})


async def acknowledge(redis: Redis) -> str | None:
    """Clear a recorded data loss; returns the record that was cleared, if any."""
    (record,) = await batcher(redis).run([("GETDEL", keys.DATA_LOST)])
    return record.decode() if record else None

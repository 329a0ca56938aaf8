"""Workers alive, as every process can see it: each healthy worker stamps itself in a shared
set every few seconds, and `relay_workers_alive` counts the current stamps when any process is
scraped, so "no worker is left" shows on the API's /metrics too, where no worker remains to
report it. A worker that stops cleanly takes its stamp out; one that dies or gets stuck (its
health check failing) lets its stamp run out within LASTS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.lifecycle import Service, repeat
from relay.redis import keys, scripts

log = logging.getLogger(__name__)

INTERVAL = 10.0
# Three beats: one slow or failed round trip does not count a worker out.
LASTS = 3 * INTERVAL


class Heartbeat(Service):
    name = "heartbeat"

    def __init__(self, redis: Redis, healthy: Callable[[], bool]) -> None:
        self.healthy = healthy
        # The pod's name in Kubernetes, and the pid for several workers on one host.
        self.member = f"{socket.gethostname()}:{os.getpid()}"
        self._stamp = scripts.register(redis, __name__)

    async def beat(self) -> None:
        """Stamp this worker alive if it is healthy; raises RedisError."""
        if self.healthy():
            await self._stamp(keys=[keys.WORKERS], args=[self.member, LASTS])

    async def leave(self) -> None:
        """Count this worker out now (it is stopping)."""
        try:
            await self._stamp(keys=[keys.WORKERS], args=[self.member, 0])
        except RedisError as exc:
            log.warning("could not take the heartbeat out: %s", type(exc).__name__)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every INTERVAL seconds until `stop` is set, then leave."""
        await repeat(self.beat, every=INTERVAL, stop=stop, what="heartbeat")
        await self.leave()

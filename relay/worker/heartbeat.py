"""Workers alive, as every process can see it: each healthy worker stamps itself in a shared
set every few seconds, and `relay_workers_alive` counts the current stamps when any process is
scraped, so "no worker is left" shows on the API's /metrics too, where no worker remains to
report it. A worker that stops cleanly takes its stamp out; one that dies or gets stuck (its
health check failing) lets its stamp run out within LASTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay import keys, lua

log = logging.getLogger(__name__)

INTERVAL = 10.0
# Three beats: one slow or failed round trip does not count a worker out.
LASTS = 3 * INTERVAL


class Heartbeat:
    def __init__(self, redis: Redis, healthy: Callable[[], bool]) -> None:
        self.healthy = healthy
        # The pod's name in Kubernetes, and the pid for several workers on one host.
        self.member = f"{socket.gethostname()}:{os.getpid()}"
        self._stamp = lua.register(redis, __package__, "heartbeat")

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
        while not stop.is_set():
            try:
                await self.beat()
            except RedisError as exc:
                log.warning("could not stamp the heartbeat: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=INTERVAL)
        await self.leave()

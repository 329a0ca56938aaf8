"""Periodic work that one worker does for all: whoever takes the lease runs it this interval.

The lease (SET NX with a TTL of one interval) is never released: it spaces the runs an interval
apart across all workers, and a worker that dies mid-run only delays the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from relay.lifecycle import repeat
from relay.redis.batch import batcher


async def run_leased(
    redis: Redis,
    *,
    lease_key: str,
    token: str,
    interval: float,
    once: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    what: str,
) -> None:
    """Run `once` every `interval` while this process holds `lease_key`, until `stop`."""

    async def turn() -> None:
        hold = ("SET", lease_key, token, "NX", "PX", int(interval * 1000))
        if (await batcher(redis).run([hold]))[0]:
            await once()

    await repeat(turn, every=interval, stop=stop, what=what)

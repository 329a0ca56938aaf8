"""Periodic work that one worker does for all: whoever takes the lease runs it this interval.

The lease (SET NX with a TTL of one interval) is never released: it spaces the runs an interval
apart across all workers, and a worker that dies mid-run only delays the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


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
    while not stop.is_set():
        try:
            if await redis.set(lease_key, token, nx=True, px=int(interval * 1000)):
                await once()
        except RedisError as exc:
            log.warning("%s skipped: %s", what, type(exc).__name__)
        except Exception:
            # A bug here must not stop the worker; the next interval tries again.
            log.exception("%s failed", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)

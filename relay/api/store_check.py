"""Proving the job store takes writes before Chamelaion is asked to create a job.

A PING per submission cost a round trip each and proved less than needed: a Redis that answers
PING may still refuse writes (out of memory, a read-only replica after a failover, a failed
snapshot with stop-writes-on-bgsave-error). `WriteCheck` makes a real write instead, and shares
it: every caller waits for a write that was sent after the caller arrived, so each one still
has its own proof, but callers that arrive together share one round trip.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from relay.redis import keys
from relay.redis.batch import batcher

# The check key's lifetime: it only needs to exist for as long as it is being written.
CHECK_TTL_MS = 60_000


def _retrieve(future: asyncio.Future[None]) -> None:
    # Every waiter may have gone (cancelled): an unread error must not be reported as lost.
    if not future.cancelled():
        future.exception()


class WriteCheck:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._waiting: asyncio.Future[None] | None = None  # the next write's waiters
        self._writer: asyncio.Task[None] | None = None

    async def ensure_writable(self) -> None:
        """Return once Redis has taken a write sent after this call began; raise its error."""
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_future()
            self._waiting.add_done_callback(_retrieve)
        waiting = self._waiting
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="store-write-check")
        # Shielded: one caller going away must not cancel the others' proof.
        await asyncio.shield(waiting)

    async def _write(self) -> None:
        while self._waiting is not None:
            # Everyone waiting now arrived before this write is sent; later arrivals wait for
            # the next one.
            waiting, self._waiting = self._waiting, None
            try:
                await batcher(self._redis).run(
                    [("SET", keys.WRITE_CHECK, b"1", "PX", CHECK_TTL_MS)]
                )
            except BaseException as exc:
                waiting.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                waiting.set_result(None)

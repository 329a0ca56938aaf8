"""Coalesced round trips: the Redis calls that concurrent tasks make in one event-loop turn go
to Redis as one pipeline.

When a thousand jobs end at once, each makes a handful of small scripts and reads. Sent one by
one, every call costs a round trip: a send syscall and ~100-250 µs of a busy worker's CPU in
redis-py (more on Python 3.11, whose asyncio.wait_for runs every timed send in a task of its
own). Pipelined, a call costs a tenth of that. Nothing else changes: every call is still its own
command with its own result or error, one `run`'s calls go back to back in the order given, and
no transaction joins calls of different tasks (just as separate round trips would not; nor are
calls of different tasks ordered beyond one pipeline, as they never were). A lone call waits
one turn of the event loop for company, which costs microseconds.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

# Calls per pipeline at most: bounds one round trip's size and its reply's memory.
MAX_BATCH = 512

Arg = str | bytes | int | float


@dataclass(frozen=True)
class ScriptCall:
    script: AsyncScript
    keys: Sequence[str | bytes]
    args: Sequence[Arg]


Call = ScriptCall | tuple[Arg, ...]  # a script, or a plain command and its arguments


class Batcher:
    def __init__(self, redis: Redis) -> None:
        # Weakly: the registry below must not keep a client alive (its callers hold it).
        self._redis = weakref.ref(redis)
        self._waiting: list[tuple[Sequence[Call], asyncio.Future[list[Any]]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self, calls: Sequence[Call]) -> list[Any]:
        """Run `calls` in order, back to back in one round trip; their results, in order.

        Raises the first call's error if any failed (the others still ran)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A client outlives a test's event loop: what waited on the old one is gone.
            self._loop, self._waiting = loop, []
        done: asyncio.Future[list[Any]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((calls, done))
        return await done

    async def script(
        self, script: AsyncScript, keys: Sequence[str | bytes], args: Sequence[Arg]
    ) -> Any:
        (result,) = await self.run([ScriptCall(script, keys, args)])
        return result

    @property
    def redis(self) -> Redis:
        redis = self._redis()
        assert redis is not None, "a call on a client that is gone"
        return redis

    def _flush(self) -> None:
        waiting, self._waiting = deque(self._waiting), []
        while waiting:
            batch: list[tuple[Sequence[Call], asyncio.Future[list[Any]]]] = []
            size = 0
            while waiting and (not batch or size + len(waiting[0][0]) <= MAX_BATCH):
                calls, done = waiting.popleft()
                if not done.done():  # its caller was cancelled meanwhile
                    batch.append((calls, done))
                    size += len(calls)
            if batch:
                task = asyncio.ensure_future(self._send(batch))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Sequence[Call], asyncio.Future[list[Any]]]]) -> None:
        try:
            results = await self._execute([call for calls, _ in batch for call in calls])
        except BaseException as exc:
            for _, done in batch:
                if done.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    done.cancel()  # the sending was cancelled (loop shutdown), not the caller
                else:
                    done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for calls, done in batch:
            mine = results[start : start + len(calls)]
            start += len(calls)
            if done.done():
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(mine)

    async def _execute(self, calls: list[Call]) -> list[Any]:
        results = await self._pipeline(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # Redis restarted or flushed its script cache: a NOSCRIPT call never ran, so it is
            # safe to load the scripts and run exactly those calls again.
            scripts = {id(c.script): c.script for c in calls if isinstance(c, ScriptCall)}
            for script in scripts.values():
                script.sha = await self.redis.script_load(script.script)
            again = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, calls: list[Call]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                if isinstance(call, ScriptCall):
                    pipe.execute_command(
                        "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args
                    )
                else:
                    pipe.execute_command(*call)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


_batchers: weakref.WeakKeyDictionary[Redis, Batcher] = weakref.WeakKeyDictionary()


def batcher(redis: Redis) -> Batcher:
    """The one Batcher of this client (they share its connection pool)."""
    found = _batchers.get(redis)
    if found is None:
        found = _batchers[redis] = Batcher(redis)
    return found

"""Coalesced round trips: the Redis calls that concurrent tasks make go to Redis as pipelines on
one connection of the client's pool, held by this module.

When a thousand jobs end at once, each makes a handful of small scripts and reads. Sent one by
one, every call costs a round trip: a send syscall and ~100-250 µs of a busy process's CPU in
redis-py's per-command machinery (a pool checkout with its health check, a timeout per reply,
and on Python 3.11 a task per timed send). Pipelined on a held connection, a call costs a
tenth of that. Nothing else changes: every call is still its own command with its own result
or error, one `run`'s calls go back to back in the order given, and no transaction joins calls
of different tasks (just as separate round trips would not). A run of plain commands may be
`atomic`: sent as a MULTI/EXEC transaction, which the calls of one run, back to back on one
connection, make possible.

One pipeline is on the line at a time; calls made meanwhile go in the next, so batches grow
with the load by themselves. A lone call waits one turn of the event loop for company, which
costs microseconds. A pipeline as a whole is bounded by the client's socket timeout (one timer,
not one per reply); when it fails for the connection's sake, the calls queued behind it fail
with it rather than each waiting out the timeout again on a line known to be stalled.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Calls per pipeline at most: bounds one round trip's size and its reply's memory.
MAX_BATCH = 512
# Seconds a held connection may sit unused before it is checked (as the pool checks every
# connection it hands out) before use: Redis may have closed it meanwhile (a restart, a
# failover, its idle timeout). A line in use all along is known to be alive.
IDLE_CHECK = 1.0

Arg = str | bytes | int | float


# Not frozen dataclasses: one of each is made for every call, and a frozen one's __init__ (an
# object.__setattr__ per field) cost more than the rest of packing it.
class ScriptCall:
    __slots__ = ("args", "keys", "script")

    def __init__(
        self, script: AsyncScript, keys: Sequence[str | bytes], args: Sequence[Arg]
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args


Call = ScriptCall | tuple[Arg, ...]  # a script, or a plain command and its arguments


class _Packed(NamedTuple):
    call: Call
    command: bytes  # as sent
    name: str  # whose reply callback shapes the result, as redis-py's would


def _pack(call: Call) -> _Packed:
    if isinstance(call, ScriptCall):
        args: tuple[Arg, ...] = ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        name = "EVALSHA"
    else:
        args = call
        name = args[0] if isinstance(args[0], str) else ""
    # hiredis packs in C what redis-py packs in Python, to the same bytes; an argument it cannot
    # send raises here, to its own caller.
    command = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub says a 1-tuple
    return _Packed(call, command, name)


Waiting = tuple[list[_Packed], "asyncio.Future[list[Any]]"]


def _transaction(calls: list[_Packed]) -> list[_Packed]:
    """`calls` wrapped in MULTI and EXEC; their replies (QUEUED) are left unshaped."""
    if any(isinstance(call.call, ScriptCall) for call in calls):
        raise ValueError("an atomic run takes plain commands only")
    queued = [_Packed(call.call, call.command, "") for call in calls]
    return [_pack(("MULTI",)), *queued, _pack(("EXEC",))]


def _exec_results(
    calls: list[_Packed], replies: list[Any], callbacks: Mapping[str | bytes, Any]
) -> list[Any]:
    """Each call's result from a transaction's replies: EXEC's, shaped as redis-py would."""
    executed = replies[-1]
    if isinstance(executed, Exception):
        # Refused as queued (EXECABORT): nothing ran; the refusal says why.
        error = next((r for r in replies[1:-1] if isinstance(r, Exception)), executed)
        return [error] * len(calls)
    results = []
    for call, reply in zip(calls, executed, strict=True):
        callback = callbacks.get(call.name)
        if callback is not None and not isinstance(reply, Exception):
            reply = callback(reply)
        results.append(reply)
    return results


class Batcher:
    def __init__(self, redis: Redis) -> None:
        # Weakly: the registry below must not keep a client alive (its callers hold it).
        self._redis = weakref.ref(redis)
        self._waiting: deque[Waiting] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: asyncio.Task[None] | None = None
        self._line: AbstractConnection | None = None
        self._used_at = 0.0
        # The pipeline's bound: the client's own socket timeout, which the held connection
        # then goes without (it would cost a timer per reply).
        self._timeout: float | None = redis.connection_pool.connection_kwargs.get("socket_timeout")

    async def run(
        self, calls: Sequence[Call], *, return_exceptions: bool = False, atomic: bool = False
    ) -> list[Any]:
        """Run `calls` in order, back to back in one round trip; their results, in order.

        Raises the first call's error if any failed (the others still ran), unless
        `return_exceptions`: then each failed call's error is its result. An error of the round
        trip itself (the connection) is raised either way. `atomic`: the calls (plain commands,
        not scripts: a script is atomic already) run as one MULTI/EXEC transaction, all or
        none; one refused as it is queued fails them all with its error."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A client outlives a test's event loop: what waited on the old one is gone.
            self._loop, self._waiting, self._sender = loop, deque(), None
            if self._line is not None and self._line.is_connected:
                self._line = None  # its socket belongs to that loop: of no use on this one
        packed = [_pack(call) for call in calls]
        done: asyncio.Future[list[Any]] = loop.create_future()
        self._waiting.append((_transaction(packed) if atomic else packed, done))
        if self._sender is None:
            # After one turn of the loop, so that the calls made in this turn go together.
            self._sender = loop.create_task(self._send_all())
        results = await done
        if atomic:
            results = _exec_results(packed, results, self.redis.response_callbacks)
        if not return_exceptions:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

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

    async def _send_all(self) -> None:
        try:
            while self._waiting:
                batch = self._next_batch()
                if batch:
                    await self._send(batch)
        finally:
            self._sender = None

    def _next_batch(self) -> list[Waiting]:
        batch: list[Waiting] = []
        size = 0
        waiting = self._waiting
        while waiting and (not batch or size + len(waiting[0][0]) <= MAX_BATCH):
            calls, done = waiting.popleft()
            if not done.done():  # its caller was cancelled meanwhile
                batch.append((calls, done))
                size += len(calls)
        return batch

    async def _send(self, batch: list[Waiting]) -> None:
        try:
            results = await self._execute([call for calls, _ in batch for call in calls])
        except BaseException as exc:
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                # The line broke or stalled: what queued behind it was never sent, and would
                # only wait out the same fault again.
                batch += self._waiting
                self._waiting.clear()
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
            if not done.done():
                done.set_result(mine)  # a call's own error is raised by `run`, if it should be

    async def _execute(self, calls: list[_Packed]) -> list[Any]:
        results = await self._pipeline(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # Redis restarted or flushed its script cache: a NOSCRIPT call never ran, so it is
            # safe to load the scripts and run exactly those calls again (a script's SHA1 is
            # its text's: the packed calls stay valid).
            scripts = {
                id(c.call.script): c.call.script for c in calls if isinstance(c.call, ScriptCall)
            }
            for script in scripts.values():
                await self.redis.script_load(script.script)
            again = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, calls: list[_Packed]) -> list[Any]:
        callbacks = self.redis.response_callbacks
        results: list[Any] = []
        try:
            # The whole round trip, a reconnection's handshake included, is bounded by one
            # timer: the held connection has no timeout of its own (see _connected_line).
            async with asyncio.timeout(self._timeout):
                line = await self._connected_line()
                await line.send_packed_command([c.command for c in calls], check_health=False)
                for call in calls:
                    try:
                        reply = await line.read_response()
                    except ResponseError as exc:  # this call's own error: the line is fine
                        results.append(exc)
                        continue
                    callback = callbacks.get(call.name)
                    results.append(callback(reply) if callback is not None else reply)
        except BaseException as exc:
            # Cut off anywhere (a timeout, a connection error, a cancel), the line may be out of
            # step with its replies, or half through a handshake: it is never used again as is.
            if self._line is not None:
                await self._line.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("Timeout reading from Redis") from None
            raise
        finally:
            self._used_at = asyncio.get_running_loop().time()
        return results

    async def _connected_line(self) -> AbstractConnection:
        pool = self.redis.connection_pool
        if self._line is None:
            # Taken from the pool and never given back: closing the client (or the pool's
            # disconnect) still closes it, and the next batch reconnects it.
            self._line = await pool.get_connection()
            self._line.socket_timeout = None  # bounded per pipeline instead (see _pipeline)
        elif (
            not self._line.is_connected
            or asyncio.get_running_loop().time() - self._used_at > IDLE_CHECK
        ):
            await pool.ensure_connection(self._line)
        return self._line


_batchers: weakref.WeakKeyDictionary[Redis, Batcher] = weakref.WeakKeyDictionary()


def batcher(redis: Redis) -> Batcher:
    """The one Batcher of this client (they share its connection pool)."""
    found = _batchers.get(redis)
    if found is None:
        found = _batchers[redis] = Batcher(redis)
    return found

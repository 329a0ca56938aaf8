"""Waiting for jobs' events without asking anyone: one Redis subscription per API process,
fanned out in memory to every request that waits (`Prefer: wait`, a job's event stream, a
caller's feed).

The process subscribes once to `relay:events`, where every job event is announced as it is
recorded (relay.jobs.history); each announcement wakes the waiters of its job and of its caller.
A waiter is a future and an entry in a dict, and makes no Redis call while it waits; a status
read that waits is not even that, but parked with no task (relay.api.parked_reads, which hears
the same announcements), so thousands of them cost little more than their sockets. A waiter
registers before it reads what it waits for: an event between the read and the wait still
wakes it. When the subscription breaks (Redis restarted, a failover), every waiter is woken
once it is back, since what was announced meanwhile was not heard, and reads again.

Each waiter also listens for its client hanging up, and lets go at once when it does. When the
server shuts down (relay.api.protocol calls `drain`), every waiter is woken to answer with what
it has, so its client gets a whole answer and a clean close rather than a cut connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request

from relay.api.protocol import HANG_UP
from relay.jobs.history import ENDS, LAST, Announcement
from relay.metrics import WAITING
from relay.redis import keys

log = logging.getLogger(__name__)

T = TypeVar("T")

# What woke a waiter: an announcement's own flags (relay.jobs.history), with EVENT; or
# UNKNOWN: anything may have happened (the subscription came back after a break, or the server
# is draining), so it reads again whatever it waits for.
EVENT = 0x100
RESYNC = 0x200
UNKNOWN = RESYNC | EVENT | ENDS | LAST
# Seconds between attempts to subscribe again after a break.
RESUBSCRIBE_AFTER = 1.0
# The longest one read of the subscription waits for a message, so also the longest a stop
# waits for the read to end: at 1 s, every API shutdown took half a second on average.
READ_FOR = 0.1


class Listener(Protocol):
    """What else hears announcements: requests parked without a task (relay.api.parked_reads)."""

    def wake(self, request_id: str, flags: int) -> None: ...

    def wake_all(self) -> None: ...

    def drain(self) -> None: ...


@dataclass(eq=False)
class Watch:
    """One waiting request: what woke it since it last looked, and whether its client left."""

    kind: str
    flags: int = 0
    hung_up: bool = False
    _future: asyncio.Future[None] | None = None

    def wake(self, flags: int) -> None:
        self.flags |= flags
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def hang_up(self) -> None:
        self.hung_up = True
        self.wake(0)

    async def next(self, timeout: float) -> int:
        """Wait for the next announcement (or what woke it meanwhile) for up to `timeout`
        seconds; the flags of what woke it, 0 when nothing did (or the client hung up)."""
        if not self.flags and not self.hung_up and timeout > 0:
            self._future = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._future
            self._future = None
        flags, self.flags = self.flags, 0
        return flags


@dataclass
class _Topic:
    watches: set[Watch] = field(default_factory=set)
    # Bumped at every wake: a read started since the last one is as fresh as any.
    generation: int = 0
    reading: tuple[int, asyncio.Task[Any]] | None = None


class Waiters:
    def __init__(self, redis: Redis, listener: Listener | None = None) -> None:
        self.redis = redis
        self.listener = listener
        self._jobs: dict[str, _Topic] = {}
        self._callers: dict[str, _Topic] = {}
        self.draining = False
        # Requests registered as waiting now (relay.api.protocol does not count them as busy).
        self.parked = 0
        # Set while the subscription holds: until then a waiter hears nothing, only its timeout.
        self.subscribed = asyncio.Event()

    def drain(self) -> None:
        """The server is shutting down: wake every waiter to answer now (idempotent)."""
        if not self.draining:
            self.draining = True
            if self.listener is not None:
                self.listener.drain()
            self._wake_all()

    @contextlib.contextmanager
    def watch(
        self, kind: str, *, job: str | None = None, caller: str | None = None
    ) -> Iterator[Watch]:
        """Register a waiter for `job`'s events, or `caller`'s, for the block's length."""
        waiter = Watch(kind)
        topics = [
            (table, name)
            for table, name in ((self._jobs, job), (self._callers, caller))
            if name is not None
        ]
        for table, name in topics:
            table.setdefault(name, _Topic()).watches.add(waiter)
        WAITING.labels(kind).inc()
        self.parked += 1
        if self.draining:
            waiter.wake(UNKNOWN)
        try:
            yield waiter
        finally:
            WAITING.labels(kind).dec()
            self.parked -= 1
            for table, name in topics:
                topic = table.get(name)
                if topic is not None:
                    topic.watches.discard(waiter)
                    if not topic.watches:
                        del table[name]

    @contextlib.asynccontextmanager
    async def listening(self, waiter: Watch, request: Request) -> AsyncIterator[None]:
        """While the block runs, a client that hangs up wakes `waiter` with `hung_up` set.

        Under the API's own protocol (relay.api.protocol) the connection says so itself, for
        nothing; elsewhere a task reads the request's remaining messages (only for a request
        whose body was read).
        """
        state = request.scope.get("state", {})
        if HANG_UP in state:
            state[HANG_UP] = waiter.hang_up
            try:
                yield
            finally:
                state[HANG_UP] = None
            return
        receive = request.receive

        async def until_hung_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            waiter.hang_up()

        listener = asyncio.create_task(until_hung_up(), name="waiter-hang-up")
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def read_once(self, request_id: str, read: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """`read()`, shared by the waiters of `request_id` that ask for it after the same
        wake (so the thousands its end wakes read it once). Call it while registered."""
        topic = self._jobs.get(request_id)
        if topic is None:
            return read()
        if topic.reading is None or topic.reading[0] != topic.generation:

            async def reading() -> T:
                return await read()

            topic.reading = (topic.generation, asyncio.ensure_future(reading()))
        # Shielded: a waiter whose client hangs up must not cancel the others' read.
        return asyncio.shield(topic.reading[1])

    @staticmethod
    def _wake(topic: _Topic, flags: int) -> None:
        topic.generation += 1
        for waiter in topic.watches:
            waiter.wake(flags)

    def _wake_all(self) -> None:
        if self.listener is not None and not self.draining:
            self.listener.wake_all()
        for table in (self._jobs, self._callers):
            for topic in table.values():
                self._wake(topic, UNKNOWN)

    def announce(self, raw: bytes) -> None:
        """Wake the waiters of the job and the caller an announcement names."""
        announcement = Announcement.parse(raw)
        if announcement is None:
            return
        if self.listener is not None:
            self.listener.wake(announcement.request_id, announcement.flags)
        for table, name in (
            (self._jobs, announcement.request_id),
            (self._callers, announcement.caller),
        ):
            topic = table.get(name)
            if topic is not None:
                self._wake(topic, announcement.flags | EVENT)

    async def run(self, stop: asyncio.Event) -> None:
        """Hold the process's one subscription until `stop`, subscribing again after a break."""
        while not stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                # Anything announced before the subscription took hold went unheard.
                self._wake_all()
                self.subscribed.set()
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=READ_FOR)
                    if message is not None and message["type"] == "message":
                        self.announce(message["data"])
            except (RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("the events subscription broke; subscribing again: %s", exc)
                self.subscribed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESUBSCRIBE_AFTER):
                        await stop.wait()
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
        self.subscribed.clear()

"""Waiting for jobs' events without asking anyone: one Redis subscription per API process,
fanned out in memory to every request that waits (`Prefer: wait`, a job's event stream, a
caller's feed).

While anything waits, the process is subscribed to `relay:events`, where every job event is
announced as it is recorded (relay.jobs.history); each announcement wakes the waiters of its job
and of its caller. A waiter is a future and an entry in a dict, and makes no Redis call while it
waits; a status read that waits is not even that, but parked with no task
(relay.api.parked_reads, which hears the same announcements), so thousands of them cost little
more than their sockets. A waiter registers before it reads what it waits for: an event between
the read and the wait still wakes it. Whenever the subscription is (re)confirmed (the first
waiter after a quiet spell, or Redis back after a break), every waiter is woken and reads again,
since what was announced before was not heard.

With nothing waiting, the process holds no subscription (it is let go LINGER seconds after the
last waiter leaves): every API process would otherwise read and decode every job's every event
(a submission's own included) whether or not anyone waits for it.

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
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError
from starlette.requests import Request

from relay.api.protocol import HANG_UP
from relay.jobs.history import ENDS, LAST, Announcement
from relay.lifecycle import sleep_until_stopped
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
# Seconds the subscription is kept with nothing waiting (between one and two of them): waits
# that come and go a few seconds apart share one subscription.
LINGER = 5.0


class Listener(Protocol):
    """What else hears announcements: requests parked without a task (relay.api.parked_reads)."""

    # Called when a read starts waiting (set by Waiters): the subscription is held for it.
    wanted: Callable[[], None]

    @property
    def holding(self) -> bool:
        """Whether any read waits now."""

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
        # Set when something starts waiting; counted, so a wait that came and went between two
        # looks still keeps the subscription for another LINGER.
        self._wanted = asyncio.Event()
        self._asked = 0
        if listener is not None:
            listener.wanted = self.want

    def want(self) -> None:
        """Something starts waiting: subscribe, unless subscribed already."""
        self._asked += 1
        self._wanted.set()

    def _waiting(self) -> bool:
        return self.parked > 0 or (self.listener is not None and self.listener.holding)

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
        self.want()
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
        """Hold the process's one subscription while anything waits, until `stop`; subscribe
        again after a break."""
        while not stop.is_set():
            if not self._waiting():
                self._wanted.clear()
                await _either(self._wanted, stop)
                continue
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                await self._hear(pubsub, stop)
            except (RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("the events subscription broke; subscribing again: %s", exc)
                self.subscribed.clear()
                await sleep_until_stopped(stop, RESUBSCRIBE_AFTER)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _hear(self, pubsub: PubSub, stop: asyncio.Event) -> None:
        """Read the subscription's messages until `stop`, or until nothing has waited for a
        LINGER (an error is raised)."""
        connection = pubsub.connection
        assert connection is not None, "subscribed without a connection"
        # Every job event of every API process comes through here, whether or not anything
        # waits: read straight off the connection, one reply a message (PubSub.get_message
        # took ~9 µs a message, a timer and a health check each; this ~2.5). Messages are
        # awaited without a timeout (the client's socket_timeout would break a quiet
        # subscription); `stop` ends the read instead. A TCP connection that dies silently goes
        # unnoticed here as it did with get_message, which had no health check either.
        timeout, connection.socket_timeout = connection.socket_timeout, None
        hearing = asyncio.ensure_future(self._messages(connection))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            asked = -1
            while True:
                done, _ = await asyncio.wait(
                    (hearing, stopping), timeout=LINGER, return_when=asyncio.FIRST_COMPLETED
                )
                if done or (not self._waiting() and asked == self._asked):
                    break
                asked = self._asked
        finally:
            stopping.cancel()
            if not hearing.done():
                hearing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hearing
            connection.socket_timeout = timeout  # the connection goes back to the pool
        if not hearing.cancelled():
            hearing.result()  # its error, if it ended on one

    async def _messages(self, connection: Connection) -> None:
        while True:
            reply = await connection.read_response()
            kind = reply[0] if isinstance(reply, list) and len(reply) == 3 else None
            if kind == b"message":
                self.announce(reply[2])
            elif kind == b"subscribe":
                # Confirmed: from here on every announcement is heard. What was announced
                # before went unheard, so every waiter reads again.
                self._wake_all()
                self.subscribed.set()


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    """Return once either event is set."""
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()

"""Callback destinations: caps on attempts in flight, and the worker's view of backed-off ones.

A destination is a callback URL's (scheme, host, port). Each has its own cap on attempts in
flight in this worker, under one cap for the whole worker, so a receiver that hangs holds only
its own slots; within a destination, slots are shared fairly among the attempts' owners (their
callers), as many services often sit behind one gateway host. Whether a destination is backed
off (its host kept failing: circuit-breaker style) is shared state in Redis, written with each
attempt's outcome (store.record_outcome.lua); this worker keeps what Redis last told it, so a
breaker costs no extra round trip per attempt. Once a back-off it saw has ended, the breaker is
half-open: it asks Redis before each attempt there, and only one attempt of all the workers'
(the probe) is made (store.claim_probe.lua) until an outcome closes it or backs it off again.
Entries for idle destinations are dropped, so memory follows what is in flight, not history;
a half-open one is kept until Redis says it is closed (or for a day).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# How long a worker remembers a destination half-open that it no longer tries.
FORGET_HALF_OPEN = 86400.0


class DestinationBusy(Exception):
    """No slot came free for the destination within the wait asked for."""


def destination_of(url: str) -> str:
    """`scheme://host:port` of a callback URL: what caps and breakers are kept per."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = 0
    return f"{scheme}://{host}:{port}"


@dataclass
class _Waiter:
    owner: str
    granted: asyncio.Future[None]


@dataclass
class _Destination:
    free: int
    users: int = 0
    backed_off_until: float = 0.0  # time.monotonic()
    # Slots held per owner, and the attempts waiting for one in arrival order.
    held: Counter[str] = field(default_factory=Counter)
    waiters: list[_Waiter] = field(default_factory=list)

    def forgettable(self) -> bool:
        """Idle, and nothing worth keeping: never backed off, or half-open for too long."""
        if self.users > 0:
            return False
        return self.backed_off_until == 0 or (
            time.monotonic() - self.backed_off_until > FORGET_HALF_OPEN
        )

    def take(self, owner: str) -> None:
        self.free -= 1
        self.held[owner] += 1

    def give_back(self, owner: str) -> None:
        self.held[owner] -= 1
        if self.held[owner] <= 0:
            del self.held[owner]
        self.free += 1
        self.hand_on()

    def hand_on(self) -> None:
        """Give free slots to waiters: each to the earliest waiter of the owner holding the
        fewest, so one owner's queue never stands in front of another's first attempt."""
        while self.free > 0 and self.waiters:
            chosen = min(self.waiters, key=lambda waiter: self.held[waiter.owner])
            self.waiters.remove(chosen)
            self.take(chosen.owner)
            chosen.granted.set_result(None)


@dataclass
class Destinations:
    per_destination: int
    total: int
    in_flight: int = 0
    waiting: int = 0
    _known: dict[str, _Destination] = field(default_factory=dict)
    _total: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._total = asyncio.Semaphore(self.total)

    def _get(self, destination: str) -> _Destination:
        entry = self._known.get(destination)
        if entry is None:
            entry = self._known[destination] = _Destination(self.per_destination)
        return entry

    def _release(self, destination: str, entry: _Destination) -> None:
        entry.users -= 1
        if entry.forgettable():
            self._known.pop(destination, None)

    @contextlib.asynccontextmanager
    async def _destination_slot(self, entry: _Destination, owner: str) -> AsyncIterator[None]:
        if entry.free > 0 and not entry.waiters:
            entry.take(owner)
        else:
            waiter = _Waiter(owner, asyncio.get_running_loop().create_future())
            entry.waiters.append(waiter)
            try:
                await waiter.granted
            except BaseException:
                if waiter in entry.waiters:
                    entry.waiters.remove(waiter)
                elif waiter.granted.done() and not waiter.granted.cancelled():
                    entry.give_back(owner)  # granted just as it gave up: pass it on
                raise
        try:
            yield
        finally:
            entry.give_back(owner)

    @contextlib.asynccontextmanager
    async def slot(
        self, destination: str, *, owner: str, wait: float | None
    ) -> AsyncIterator[None]:
        """Hold one of the destination's slots (and one of the worker's) while sending.

        `owner`: whose attempt it is (the job's caller, else the job): when the destination's
        slots are all taken, the next free one goes to the owner holding the fewest, so one
        caller's flood of slow callbacks to a shared host cannot take every slot.
        `wait`: how long to queue for them at most (DestinationBusy after); None: as long as it
        takes.
        """
        entry = self._get(destination)
        entry.users += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                self.waiting += 1
                try:
                    async with asyncio.timeout(wait):
                        await stack.enter_async_context(self._destination_slot(entry, owner))
                        await stack.enter_async_context(self._total)
                except TimeoutError:
                    raise DestinationBusy(destination) from None
                finally:
                    self.waiting -= 1
                self.in_flight += 1
                try:
                    yield
                finally:
                    self.in_flight -= 1
        finally:
            self._release(destination, entry)

    def backed_off_for(self, destination: str) -> float:
        """Seconds this destination is still backed off for, as Redis last said; 0 if not."""
        entry = self._known.get(destination)
        if entry is None:
            return 0.0
        left = entry.backed_off_until - time.monotonic()
        if left <= 0 and entry.forgettable():
            self._known.pop(destination, None)
        return max(0.0, left)

    def half_open(self, destination: str) -> bool:
        """Did a back-off this worker saw end without Redis saying the breaker closed since?
        Then an attempt asks Redis first (DeliveryStore.claim_probe)."""
        entry = self._known.get(destination)
        return entry is not None and 0 < entry.backed_off_until <= time.monotonic()

    def record(self, destination: str, backed_off_for: float) -> None:
        """What Redis said about the destination after an attempt's outcome was written."""
        if backed_off_for > 0:
            self._get(destination).backed_off_until = time.monotonic() + backed_off_for
        else:
            entry = self._known.get(destination)
            if entry is not None:
                entry.backed_off_until = 0.0
                if entry.users == 0:
                    self._known.pop(destination, None)

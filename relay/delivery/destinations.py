"""Callback destinations: caps on attempts in flight, and the worker's view of backed-off ones.

A destination is a callback URL's (scheme, host, port). Each has its own cap on attempts in
flight in this worker, under one cap for the whole worker, so a receiver that hangs holds only
its own slots. Whether a destination is backed off (it kept failing: circuit-breaker style) is
shared state in Redis, written with each attempt's outcome (store.record_outcome.lua); this
worker keeps what Redis last told it, so a breaker costs no extra round trip per attempt.
Entries for idle destinations are dropped, so memory follows what is in flight, not history.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


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
class _Destination:
    slots: asyncio.Semaphore
    users: int = 0
    backed_off_until: float = 0.0  # time.monotonic()


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
            entry = self._known[destination] = _Destination(asyncio.Semaphore(self.per_destination))
        return entry

    def _release(self, destination: str, entry: _Destination) -> None:
        entry.users -= 1
        if entry.users == 0 and entry.backed_off_until <= time.monotonic():
            self._known.pop(destination, None)

    @contextlib.asynccontextmanager
    async def slot(self, destination: str, *, wait: float | None) -> AsyncIterator[None]:
        """Hold one of the destination's slots (and one of the worker's) while sending.

        `wait`: how long to queue for them at most (DestinationBusy after); None: as long as it
        takes, in arrival order.
        """
        entry = self._get(destination)
        entry.users += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                self.waiting += 1
                try:
                    async with asyncio.timeout(wait):
                        await stack.enter_async_context(entry.slots)
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
        if left <= 0 and entry.users == 0:
            self._known.pop(destination, None)  # expired and idle: forget it
        return max(0.0, left)

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

"""Status reads that wait (`Prefer: wait`), parked: held by their connection alone.

Thousands of reads may wait on one job. Each would otherwise hold a task and the whole stack of
middleware and routing above it; parked (relay.api.protocol), a read holds its connection, an
entry here and a timer. When its job ends, one read of the job answers every read parked on it
with the same bytes (the route's own answer, made once for each wait length), written straight
to their connections: no task, no middleware, no per-read encoding.

What is not the ordinary end goes back through the app, which answers it as the route does
for a read whose wait is over (WAITED in its state: the job as it stands): a wait that runs out,
the server shutting down, a job that ended without a body the relay holds, a failed read.
A read whose job ends while it is being parked is not parked: it waits the ordinary way
(relay.api.waiting), which hears of it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.api import prefer
from relay.api.protocol import HANG_UP, PARK, ParkedRequest, Prepared, answer_parked
from relay.api.responses import json_bytes
from relay.api.waiters import RESYNC
from relay.jobs.history import ENDS
from relay.jobs.store import Job, JobStore
from relay.metrics import WAITING

log = logging.getLogger(__name__)

# In the state of a read dispatched again: its wait is over, answer with the job as it stands.
WAITED = "relay.waited"

_WAITING = WAITING.labels("wait")
# Seconds: a wait that runs out is answered within this much of its end.
TICK = 0.1


def tracked_answer(job: Job, wait: int | None) -> Response | None:
    """A status read's answer from the relay's own state, when it holds the job's body: what
    the route answers, and (`wait` the seconds it may have waited) what a parked read hears."""
    if job.body is None:
        return None
    return json_bytes(job.body, headers=None if wait is None else prefer.applied(wait))


def _nothing() -> None:
    pass


class ParkedRead:
    """One parked read. Called, it lets go (its client hung up: relay.api.protocol's HANG_UP)."""

    __slots__ = ("due", "parked", "reads", "request_id", "seconds", "woken")

    def __init__(self, reads: ParkedReads, request_id: str, seconds: int) -> None:
        self.reads = reads
        self.request_id = request_id
        self.seconds = seconds
        # Set while it is being parked by anything that may have ended its job.
        self.woken = False
        self.parked: ParkedRequest | None = None
        self.due = 0  # when its wait runs out, in TICKs of the loop's clock

    def __call__(self) -> None:
        self.reads._let_go(self)


class _Parking(Response):
    """The route's answer that is no answer: its call parks the read (the last thing the app
    does before it returns)."""

    def __init__(self, read: ParkedRead) -> None:
        self.read = read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["state"]
        parked: ParkedRequest = state[PARK]
        parked.park()
        self.read.parked = parked
        state[HANG_UP] = self.read
        self.read.reads._hold(self.read)


class ParkedReads:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.draining = False
        self._reads: dict[str, set[ParkedRead]] = {}
        # Reads registered but not parked yet (their job's end is being checked).
        self._pending: dict[str, set[ParkedRead]] = {}
        # One task per job answering its parked reads; a job woken again while it runs is in
        # `_again` (it reads once more).
        self._settling: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        # Reads by the tick their wait runs out at; one timer a tick, not one a read (a timer
        # costs ~500 bytes, and holds the context it was made in).
        self._due: dict[int, set[ParkedRead]] = {}
        # Called as a read starts waiting: relay.api.waiters holds its subscription while any
        # does (it sets this).
        self.wanted: Callable[[], None] = _nothing

    @property
    def holding(self) -> bool:
        """Whether any read is parked, or being parked, now."""
        return bool(self._reads or self._pending)

    async def park(self, request: Request, request_id: str, seconds: int) -> Response | None:
        """A response whose call parks the read until the job ends or `seconds` pass; None
        when the read cannot be parked (not under the API's protocol, the server draining, the
        job ended meanwhile, a HEAD): it then waits the ordinary way."""
        if PARK not in request.scope["state"] or request.method != "GET" or self.draining:
            return None  # a HEAD's answer has no body: uvicorn's own path leaves it out
        read = ParkedRead(self, request_id, seconds)
        pending = self._pending.setdefault(request_id, set())
        pending.add(read)
        self.wanted()
        try:
            while True:
                # Asked once registered: an end since the caller's own read would go unheard.
                # Woken meanwhile, it asks again rather than give up its parking: the first
                # waiter's subscription is confirmed with a wake of everything (relay.api.
                # waiters), and the reads arriving then would otherwise all wait the ordinary
                # way, answered after the parked ones (the 5,000-waiter bench's 200 ms tail).
                read.woken = False
                ended = await self.store.has_ended(request_id)
                if ended or self.draining or not read.woken:
                    break
        except RedisError:
            return None
        finally:
            pending.discard(read)
            if not pending:
                del self._pending[request_id]
        if ended or self.draining:
            return None
        return _Parking(read)

    def _hold(self, read: ParkedRead) -> None:
        self._reads.setdefault(read.request_id, set()).add(read)
        loop = asyncio.get_running_loop()
        read.due = math.ceil((loop.time() + read.seconds) / TICK)
        due = self._due.get(read.due)
        if due is None:
            due = self._due[read.due] = set()
            loop.call_at(read.due * TICK, self._expire_due, read.due, context=contextvars.Context())
        due.add(read)
        _WAITING.inc()

    def _let_go(self, read: ParkedRead) -> bool:
        """Take `read` out (its client hung up, it is answered); False if it was out already."""
        reads = self._reads.get(read.request_id)
        if reads is None or read not in reads:
            return False
        reads.discard(read)
        if not reads:
            del self._reads[read.request_id]
        self._due.get(read.due, set()).discard(read)
        _WAITING.dec()
        return True

    def _expire_due(self, tick: int) -> None:
        for read in self._due.pop(tick, ()):
            self._expire(read)

    def _expire(self, read: ParkedRead) -> None:
        """The app answers it again: as the route does once a wait is over."""
        if self._let_go(read) and read.parked is not None:
            read.parked.state[WAITED] = True
            read.parked.dispatch_again()

    def wake(self, request_id: str, flags: int) -> None:
        """An announcement for `request_id` (relay.api.waiters)."""
        if not flags & (ENDS | RESYNC):
            return
        for read in self._pending.get(request_id, ()):
            read.woken = True
        if request_id in self._reads:
            self._settle(request_id)

    def wake_all(self) -> None:
        """Anything may have happened (the subscription came back): every job is read again."""
        for pending in self._pending.values():
            for read in pending:
                read.woken = True
        for request_id in list(self._reads):
            self._settle(request_id)

    def drain(self) -> None:
        """The server is shutting down: every read answers now (idempotent)."""
        self.draining = True
        self.wake_all()

    def _settle(self, request_id: str) -> None:
        if request_id in self._settling:
            self._again.add(request_id)
            return
        self._settling[request_id] = asyncio.get_running_loop().create_task(
            self._settling_job(request_id), name="parked-reads"
        )

    async def _settling_job(self, request_id: str) -> None:
        try:
            while True:
                self._again.discard(request_id)
                try:
                    job = await self.store.get(request_id)
                except RedisError:
                    log.warning("job store unavailable for parked reads: answering them afresh")
                    job = None
                else:
                    if job is not None and job.ended and self._answer(job):
                        return
                if job is None or job.ended or self.draining:
                    for read in list(self._reads.get(request_id, ())):
                        self._expire(read)
                if request_id not in self._again:
                    return
        finally:
            del self._settling[request_id]
            self._again.discard(request_id)

    def _answer(self, job: Job) -> bool:
        """Answer every read parked on `job` with its end; False if the relay holds no body."""
        prepared: dict[int, Prepared] = {}
        for seconds in {read.seconds for read in self._reads.get(job.request_id, ())}:
            response = tracked_answer(job, seconds)
            if response is None:
                return False
            prepared[seconds] = Prepared(
                response.status_code, response.raw_headers, bytes(response.body)
            )
        reads = self._reads.pop(job.request_id, set())
        answer_parked(
            (read.parked, prepared[read.seconds]) for read in reads if read.parked is not None
        )
        for read in reads:
            self._due.get(read.due, set()).discard(read)
        _WAITING.dec(len(reads))
        return True


def waited(request: Request) -> bool:
    """Whether the read was parked and its wait is over (answer it with the job as it is)."""
    state: dict[str, Any] = request.scope["state"]
    return bool(state.get(WAITED))
